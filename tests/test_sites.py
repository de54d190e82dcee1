import pytest

from probes import UnknownSiteError, all_sites, parse_site, site


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
