"""The family registry: built-in families are found, not listed, and LoRA signatures that overlap
are asked in order of precedence."""

import pkgutil

import deployments.families as families
from deployments.families import BUILTIN, VIDEO_BUILTIN, ImageFamily, LoraSignature, get_family, lora_family_of


def test_every_family_module_of_the_package_is_a_builtin_and_nothing_else_is():
    modules = {info.name for info in pkgutil.iter_modules(families.__path__)} - {"base", "video_base"}
    found = {module.rsplit(".", 1)[1] for module in [*BUILTIN.values(), *VIDEO_BUILTIN.values()]}
    assert found == modules
    assert {"flux", "sdxl", "sd15"} <= set(BUILTIN) and {"svd", "ltx", "animatediff"} <= set(VIDEO_BUILTIN)
    assert all(get_family(name).name == name for name in BUILTIN)


def _family(name: str, signature: LoraSignature) -> ImageFamily:
    family = type(f"{name}Family", (ImageFamily,), {"name": name, "description": name, "pipeline_class": "X",
                                                     "lora": signature})
    return family()


def test_a_narrower_signature_with_precedence_wins_whatever_the_order():
    broad = _family("broad", LoraSignature(metadata_prefixes=("flux",), key_prefixes=("transformer.",)))
    narrow = _family("narrow", LoraSignature(metadata_prefixes=("flux-2",), key_fragments=("to_qkv_mlp_proj",),
                                             precedence=1))
    keys = ["transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight"]
    for order in ([broad, narrow], [narrow, broad]):
        assert lora_family_of(["flux-2-klein-4b"], [], lambda: None, order) == "narrow"
        assert lora_family_of([], keys, lambda: None, order) == "narrow"
        assert lora_family_of(["flux1"], ["transformer.x"], lambda: None, order) == "broad"
