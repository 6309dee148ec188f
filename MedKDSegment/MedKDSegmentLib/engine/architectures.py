"""Which architectures a bundle may name, and the bounds on their settings: checked when a bundle is opened,
before anything is built, and without torch (``networks`` builds them)."""

from __future__ import annotations

# Networks built from their settings (``networks.NETWORKS`` holds their classes, under these names).
NETWORK_NAMES = ("UNet", "FastStudent", "HDBETEnsemble", "DeepBETModels", "SpacingVNet", "LiverUNet",
                 "NnUNetEnsemble")
# Imported teachers whose network is not built from settings: a user's TorchScript file (loaded as it is) and
# a MONAI bundle's network_def (parsed from its own copied config by ``monai_bundle``).
IMPORTED_ARCHITECTURES = ("TorchScript", "MonaiBundle")

# Bounds on a bundle's architecture settings, checked before anything is built: no network here needs
# more, and a hostile or damaged bundle must not make the machine allocate gigabytes first.
MAX_SETTING = 4096
MAX_LIST = 16


def architecture_problem(config) -> str | None:
    """What is wrong with an architecture ``{"name": ..., "kwargs": {...}}`` from a bundle, or None."""
    if isinstance(config, dict) and config.get("name") in IMPORTED_ARCHITECTURES:
        return None if not config.get("kwargs") else f"a {config['name']} architecture takes no settings"
    if not isinstance(config, dict) or config.get("name") not in NETWORK_NAMES:
        return f"architecture must name one of {', '.join([*NETWORK_NAMES, *IMPORTED_ARCHITECTURES])}"
    kwargs = config.get("kwargs", {})
    if not isinstance(kwargs, dict):
        return "architecture kwargs must be an object"
    if config["name"] == "NnUNetEnsemble":  # nested settings from nnU-Net's plans, checked there
        from .nnunet import architecture_problem as nnunet_architecture_problem  # torch: such a teacher needs it

        return nnunet_architecture_problem(kwargs)
    for key, value in kwargs.items():
        items = value if isinstance(value, list) else [value]
        if len(items) > MAX_LIST or not all(isinstance(v, (bool, int, float, str)) for v in items):
            return f"architecture setting '{key}' must be a number, a word or a short list of numbers"
        if any(not isinstance(v, (bool, str)) and not -MAX_SETTING <= v <= MAX_SETTING for v in items):
            return f"architecture setting '{key}' = {value!r} is beyond any network's size"
    return None
