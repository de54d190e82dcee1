"""Remote models through NDIF: the model runs on the NDIF cluster, the statistics are reduced here.

``load_model("meta-llama/Llama-3.1-70B", remote=True)`` builds the model's skeleton on the meta device
(a config read, no weights) and returns a :class:`RemoteProbe`. Each ``probe.run(tokens, reads=...)``
is one nnsight trace sent to NDIF (``model.trace(..., remote=True)``): the trace saves the raw tensors
of the read sites, the server returns them, and the reducers fold them in locally — the same
reducers, in the same order, as a local run.

What fits nnsight's remote tracing model: sites that are real module inputs or outputs on the HF
module tree (``hook_embed``, ``hook_resid_pre/mid/post``, ``attn.hook_z``, ``hook_attn_out``,
``mlp.hook_post``, ``hook_mlp_out``, ``ln_final.hook_normalized``, ``hook_logits``). Attention
patterns and q/k/v need Sonde's attention taps inside the model (the server's copy has none), and
edits and reducers are Sonde code the server cannot import, so those raise a clear error.

Before anything heavy, :func:`check_ndif` looks for an API key (``NDIF_API_KEY`` or nnsight's
config) and opens a TCP connection to the NDIF host; offline or without a key it raises one line
saying what is missing. ``remote="local"`` runs the same trace through nnsight's local simulation of
the remote path (the request is serialized and deserialized exactly as for NDIF, then run in this
process on real weights) — the test suite uses it to check the remote code path without a network.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

import torch

from .backend import ModelInfo, Probe, _Plan
from .errors import ConfigError, DeviceError, ModelLoadError, UnknownSiteError
from .sites import Site

__all__ = ["RemoteProbe", "load_remote", "check_ndif", "ndif_api_key", "ndif_host", "REMOTE_SITES"]

#: site kinds a remote trace can read (real module inputs/outputs on the HF tree)
REMOTE_SITES = ("embed", "resid_pre", "resid_mid", "resid_post", "z", "attn_out", "mlp_pre", "mlp_post", "mlp_out",
                "ln_final", "logits")
_KEY_HINT = ("Get a key at https://login.ndif.us and set it with `export NDIF_API_KEY=...` "
             "(or `nnsight.CONFIG.set_default_api_key(...)`); without one, load the model locally (drop --remote).")


def ndif_api_key() -> str | None:
    """The NDIF API key: ``$NDIF_API_KEY``, else nnsight's configured key, else None."""
    key = os.environ.get("NDIF_API_KEY")
    if key:
        return key
    try:
        from nnsight import CONFIG

        return CONFIG.API.APIKEY or None
    except Exception:  # pragma: no cover - nnsight is a dependency
        return None


def ndif_host() -> str:
    """The NDIF API host URL (``$NDIF_HOST``, else nnsight's config, else ``https://api.ndif.us``)."""
    host = os.environ.get("NDIF_HOST")
    if host:
        return host
    try:
        from nnsight import CONFIG

        return CONFIG.API.HOST or "https://api.ndif.us"
    except Exception:  # pragma: no cover
        return "https://api.ndif.us"


def check_ndif(timeout: float = 3.0) -> tuple[str, str]:
    """``(api_key, host)`` if a remote run can start; else one clear error saying what it needs.

    Raises:
        ModelLoadError: no API key is configured.
        DeviceError: the host URL is malformed or cannot be reached (offline, firewall).
    """
    key = ndif_api_key()
    if not key:
        raise ModelLoadError("remote=True runs the model on NDIF, which needs an API key and network access; "
                             "no NDIF API key is set.", hint=_KEY_HINT)
    host = ndif_host()
    scheme, _, rest = host.partition("://")
    if scheme not in ("http", "https") or not rest:
        raise DeviceError(f"the NDIF host {host!r} is not an http(s) URL.", hint="Set NDIF_HOST=https://api.ndif.us (or unset it).")
    hostport = rest.split("/", 1)[0]
    name, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "")
    port_n = int(port) if port.isdigit() else (443 if scheme == "https" else 80)
    try:
        with socket.create_connection((name, port_n), timeout=timeout):
            pass
    except OSError as e:
        raise DeviceError(f"remote=True needs network access to NDIF, but {host} cannot be reached ({type(e).__name__}: {e}).",
                          hint="Check the connection (and NDIF_HOST), or load the model locally (drop --remote).") from e
    return key, host


def _info(hf_model: torch.nn.Module, name: str, source: str, arch) -> ModelInfo:
    """:class:`ModelInfo` of a skeleton whose weights may be on the meta device (fingerprint from the config)."""
    import dataclasses
    import hashlib
    import json

    from .backend import _summary

    try:
        return _summary(hf_model, name, source, arch)
    except (NotImplementedError, RuntimeError):  # meta tensors cannot be read: hash the config only
        pass
    fp = hashlib.sha256(("remote:" + json.dumps(hf_model.config.to_dict(), sort_keys=True, default=str)).encode()).hexdigest()[:16]
    return dataclasses.replace(_summary(hf_model, name, source, arch, fingerprint=fp), device="remote")


class RemoteProbe(Probe):
    """A probe whose forward passes run on NDIF (or nnsight's local simulation of it).

    Args:
        lm: an ``nnsight.LanguageModel`` (its weights may be on the meta device).
        remote: ``True`` (NDIF) or ``"local"`` (serialize the request and run it here; for tests).
    """

    backend = "nnsight"

    def __init__(self, lm: Any, tokenizer: Any, *, name: str, source: str, remote: bool | str = True):
        from .arch import arch_for

        if remote not in (True, "local"):
            raise ConfigError(f"remote={remote!r}; use True (NDIF) or 'local' (simulate the request here).")
        self._lock = threading.RLock()  # what Probe.__init__ makes (this skips it: no local weights)
        self.nn = lm
        self.remote = remote
        self.hf_model = lm._module
        self.tokenizer = tokenizer
        self.arch = arch_for(self.hf_model)
        self.info = _info(self.hf_model, name, source, self.arch)

    def __getstate__(self) -> dict[str, Any]:
        # nnsight serializes the probe with a trace's frame; a lock belongs to one process and is remade on arrival
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def supports(self, feature: str) -> bool:
        if feature in ("remote",):
            return True
        if feature in ("pattern", "pattern_edit", "generate"):
            return False
        return super().supports(feature)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # tokens are built here and shipped with the request

    def _check_site(self, s: Site) -> None:
        super()._check_site(s)
        if s.kind not in REMOTE_SITES:
            raise UnknownSiteError(
                f"{s.name} cannot be read on a remote model: it needs Sonde's attention taps inside the model, "
                "which the NDIF server's copy does not have.",
                hint=f"Remote runs read {', '.join(REMOTE_SITES)} sites; load the model locally for patterns and q/k/v.")

    def _envoy(self, path: str, layer: int | None = None):
        from .nns import NNsightProbe

        return NNsightProbe._envoy(self, path, layer)  # the same envoy tree as the local nnsight backend

    def _locate(self, s: Site):
        from .nns import NNsightProbe

        return NNsightProbe._locate(self, s)  # the same module paths as the local nnsight backend

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.run(tokens, attention_mask=attention_mask)

    def unembed(self, resid: torch.Tensor, *, apply_norm: bool = True) -> torch.Tensor:
        if self.remote is True:
            raise UnknownSiteError("unembed needs the model's weights, which stay on the NDIF server.",
                                   hint="Read blocks.{L}.hook_resid_post and hook_logits in one remote run instead.")
        return super().unembed(resid, apply_norm=apply_norm)

    def _run(self, ids: torch.Tensor, plan: _Plan, attention_mask) -> torch.Tensor:
        if plan.edits:
            raise ConfigError("edits cannot run on a remote model: they are Sonde code the NDIF server cannot import.",
                              hint="Load the model locally for interventions (drop --remote).")
        sites = plan.sites()
        located = [(s, *self._locate(s)) for s in sites]
        raw = self._trace(ids, attention_mask, [(envoy, which) for _, envoy, which, _ in located])
        logits, values = raw[0], raw[1:]
        # reduce here, in execution order, exactly as the local backend does inside its hooks
        for (s, _envoy, _which, heads), x in zip(located, values):
            x = x[0] if isinstance(x, (tuple, list)) else x
            x = x.view(*x.shape[:-1], *heads) if heads else x
            self._visit(plan, s, x)
        return logits

    def _trace(self, ids, attention_mask, targets) -> list:
        """One trace (remote or locally simulated) that saves each target's tensor and the logits."""
        import nnsight

        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask.cpu()}
        try:
            with self.nn.trace(ids.cpu(), remote=self.remote, **kwargs):
                saved = nnsight.save([(envoy.input if which == "input" else envoy.output) for envoy, which in targets])
                out = nnsight.save(self.nn.output)
        except Exception as e:
            from .errors import SondeError

            if isinstance(e, SondeError):
                raise
            raise DeviceError(f"the remote run failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                              hint="Check the NDIF status page and that NDIF hosts this model (https://nnsight.net/status).") from e
        logits = out["logits"] if isinstance(out, dict) else out.logits
        return [logits, *saved]


def load_remote(name: str, *, revision: str | None = None, tokenizer: Any = None, check: bool = True,
                remote: bool | str = True) -> RemoteProbe:
    """A :class:`RemoteProbe` for a Hugging Face id that NDIF hosts.

    The API key and the host are checked first (:func:`check_ndif`); only then is the config read and
    the skeleton built on the meta device (``LanguageModel(..., dispatch=False)``).
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError("no model was given.", hint="Pass the Hugging Face id of a model NDIF hosts.")
    if name == "embedded" or name.endswith(".gguf") or os.path.exists(os.path.expanduser(name)):
        raise ModelLoadError(f"remote=True runs Hugging Face hub models hosted by NDIF; {name!r} is a local model.",
                             hint="Drop --remote to run it here, or give a hub id such as meta-llama/Llama-3.1-8B.")
    if check and remote is True:
        check_ndif()
    import warnings

    from nnsight import LanguageModel

    try:
        with warnings.catch_warnings():  # nnsight 0.8 calls LanguageModel deprecated; NDIF still keys on it
            warnings.simplefilter("ignore")
            lm = LanguageModel(name, revision=revision, dispatch=False,
                               **({"tokenizer": tokenizer} if tokenizer is not None else {}))
    except Exception as e:
        raise ModelLoadError(f"could not read the config of {name!r} for a remote run: {type(e).__name__}: {e}",
                             hint="Check the id (and --revision); the config and tokenizer are read from the hub.") from e
    tok = lm.tokenizer
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return RemoteProbe(lm, tok, name=name, source=f"ndif:{name}" + (f"@{revision}" if revision else ""), remote=remote)
