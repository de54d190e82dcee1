from types import SimpleNamespace

import numpy as np
import pytest
import torch

from probes import (
    ConfigError, InputError, LabelError, Site, UnknownSiteError, all_sites, ffn_label, format_label, head_label, layer_label,
    neuron_label, node_label, parse_head, parse_label, parse_node, parse_site, site,
)
from probes.edits import parse_head as edits_parse_head


def test_site_names_round_trip():
    for s in all_sites(3):
        assert parse_site(s.name) == s
    assert site("resid_post", layer=3).name == "blocks.3.hook_resid_post"
    assert parse_site("blocks.2.attn.hook_out").kind == "attn_out"
    assert parse_site("blocks.2.mlp.hook_out").kind == "mlp_out"


def test_bad_names_say_what_to_do():
    with pytest.raises(UnknownSiteError, match="Did you mean blocks.0.hook_resid_post"):
        parse_site("blocks.0.hook_resid_pst")
    with pytest.raises(UnknownSiteError, match="layers 0..1"):
        parse_site("blocks.5.hook_resid_pre", n_layers=2)
    with pytest.raises(UnknownSiteError, match="needs a layer"):
        site("resid_pre")
    with pytest.raises(UnknownSiteError, match="unknown site kind"):
        site("residual")


# ----------------------------------------------------------------------------- labels (probes.labels)
INFO = SimpleNamespace(name="toy", n_layers=3, n_heads=4, d_mlp=8)


def test_labels_round_trip():
    for kind, n in (("head", INFO.n_heads), ("neuron", INFO.d_mlp), ("ffn", 1)):
        for layer in range(INFO.n_layers):
            for i in range(n):
                idx = None if kind == "ffn" else i
                lab = format_label(kind, layer, idx)
                assert parse_label(lab, ("head", "neuron", "ffn"), INFO) == (kind, layer, idx)
                assert str(parse_label(lab, ("head", "neuron", "ffn"))) == lab
    assert (head_label(5, 3), neuron_label(2, 17), ffn_label(4), layer_label(7)) == ("L5H3", "L2N17", "L4FFN", "L7")
    # the exact strings stored in results, whatever integer type the indices come as
    assert head_label(np.int64(12), torch.tensor(3)) == "L12H3" and neuron_label(np.int32(0), 40) == "L0N40"
    assert parse_head(" l5h3 ") == (5, 3) and parse_label("l2n17") == ("neuron", 2, 17)
    assert parse_label("l4ffn", ("ffn",)) == ("ffn", 4, None)
    assert edits_parse_head is parse_head  # one grammar
    for name in ("X0_0", "A3_7", "M0_12", "I2_5"):
        assert node_label(*parse_node(name)) == name


def test_label_errors_name_the_legal_forms():
    for bad in ("L5X3", "head 3", "L5", "5H3", "L5H", "L-1H2", None, 53):
        with pytest.raises(LabelError, match="unknown head or neuron label") as e:
            parse_label(bad)
        assert "L<layer>H<head> (e.g. L5H3)" in e.value.hint and "L<layer>N<neuron> (e.g. L2N17)" in e.value.hint
    with pytest.raises(LabelError, match=r"unknown head label 'L2N1'\.") as e:
        parse_head("L2N1")
    assert e.value.hint == "Name heads L<layer>H<head> (e.g. L5H3)."
    with pytest.raises(LabelError, match="unknown head or FFN label 'L1N2' in 'x'"):
        parse_label("L1N2", ("head", "ffn"), where=" in 'x'")
    # one error type, caught as either of the errors the entry points expect
    assert issubclass(LabelError, ConfigError) and issubclass(LabelError, InputError)
    with pytest.raises(LabelError, match=r"layer 3 does not exist \(toy has 3 layers\)") as e:
        parse_label("L3H0", info=INFO)
    assert e.value.hint == "Use a layer in 0..2."
    with pytest.raises(LabelError, match=r"head 4 does not exist \(toy has 4 heads per layer\)"):
        parse_head("L0H4", INFO)
    with pytest.raises(LabelError, match=r"neuron 8 does not exist \(toy has 8 neurons per layer\)"):
        parse_label("L0N8", info=SimpleNamespace(info=INFO))  # a probe works too
    assert parse_label("L2FFN", ("ffn",), INFO) == ("ffn", 2, None)
    with pytest.raises(LabelError, match="layer=1.5 is not an integer"):
        head_label(1.5, 0)
    with pytest.raises(LabelError, match="unknown graph node 'B1_2'"):
        parse_node("B1_2")
    with pytest.raises(LabelError, match="unknown component kind"):
        format_label("expert", 0, 1)


def test_site_builder_takes_integer_types():
    assert site("z", np.int64(2)) == site("z", 2) == Site("z", 2)
    assert site("pattern", torch.tensor(1)).name == "blocks.1.attn.hook_pattern"
    for bad in (1.0, True, -1, "2"):
        with pytest.raises(UnknownSiteError, match="needs a layer index"):
            site("z", bad)
