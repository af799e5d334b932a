"""The workstation profiles (configs/workstation-{24,16,12}gb.yaml) against the memory plan: each fits
its card, a profile too large for a card is refused at config load naming the model, its GiB and the
card, and `genserve doctor` says which shipped profile fits a card. Offline: the plan counts the
published architectures in deployments/architectures/."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from serve_app.cli import main
from serve_app.config import AppArgs, app_args_from_config
from serve_app.doctor import Machine, run_doctor

ROOT = Path(__file__).parents[2]
PROFILES = {"workstation-24gb.yaml": 23.6, "workstation-16gb.yaml": 15.6, "workstation-12gb.yaml": 11.7}
GIB = 2**30


@pytest.mark.parametrize("profile", PROFILES)
def test_each_workstation_profile_fits_its_card_with_every_model_of_the_product(profile):
    args = app_args_from_config(ROOT / "configs" / profile)
    plan = args.memory_plan()
    assert args.gpu.memory_gib == PROFILES[profile] and plan.problems() == []
    assert plan.needed <= plan.capacity
    names = {model.name for model in plan.models}
    assert {"flux-schnell", "sdxl", "svd-xt", "scorers"} <= names
    assert args.image_model("sdxl").model_family.control_types(args.image_model("sdxl").model_family.options_of(
        args.image_model("sdxl"))) == ("canny",)
    # The LLM enhancer where it fits (24 GB), the templates where it does not.
    assert ("enhancer" in names) == (args.enhancer.mode == "llm")
    # Each deployment's CUDA cap is its planned peak on the card, not Ray's scheduling share.
    for model in plan.models:
        name = {"scorers": "ClipScorer", "enhancer": "PromptEnhancer"}.get(model.name) or next(
            entry.deployment_name for entry in [*args.served_image_models, *args.served_video_models]
            if entry.id == model.name)
        assert args.memory_fraction(name) * plan.capacity >= model.peak


def _args_with_card(profile: str, memory_gib: float) -> dict:
    raw = yaml.safe_load((ROOT / "configs" / profile).read_text())
    args = raw["applications"][0]["args"]
    args["gpu"]["memory_gib"] = memory_gib
    return raw


def test_a_profile_that_cannot_fit_its_card_fails_at_load_naming_the_model_its_gib_and_the_card():
    args = _args_with_card("workstation-24gb.yaml", 11.7)["applications"][0]["args"]
    with pytest.raises(ValidationError, match=r"gpu \(rtx-4090, 11.7 GiB\): model flux-schnell needs 13.1 GiB on "
                                              r"the GPU by itself .* more than the rtx-4090's 11.7 GiB"):
        AppArgs.model_validate(args)
    # Each model fits alone on 16 GB, but the resident LLM and CLIP beside the largest do not.
    args = _args_with_card("workstation-24gb.yaml", 15.6)["applications"][0]["args"]
    with pytest.raises(ValidationError, match=r"the models need 1[78].\d GiB together, more than the rtx-4090's 15.6 GiB"):
        AppArgs.model_validate(args)


def test_download_dry_run_and_serve_exit_non_zero_on_an_overfull_profile(tmp_path, capsys):
    overfull = tmp_path / "overfull.yaml"
    overfull.write_text(yaml.safe_dump(_args_with_card("workstation-24gb.yaml", 11.7)))
    for command in (["download", str(overfull), "--dry-run"], ["serve", str(overfull)]):  # serve: before Ray starts
        assert main(command) == 2
        error = capsys.readouterr().err
        assert "model flux-schnell needs 13.1 GiB" in error and "rtx-4090's 11.7 GiB" in error


def test_doctor_says_which_shipped_profile_fits_the_card():
    out = io.StringIO()
    machine = Machine("2.13.0+cu130", "13.0", [("NVIDIA GeForce RTX 4080", int(15.6 * GIB))], driver="580.65.06")
    run_doctor(str(ROOT / "configs" / "workstation-16gb.yaml"), machine, out=out)
    lines = out.getvalue().splitlines()
    assert any(line.startswith("ok    memory plan on NVIDIA GeForce RTX 4080 (15.6 GiB): 13.2 GiB needed") for line in lines)
    [fits] = [line for line in lines if "shipped profiles that fit" in line]
    assert "configs/workstation-16gb.yaml" in fits and "configs/workstation-12gb.yaml" in fits
    assert "workstation-24gb" not in fits
    # On a 12 GB card the 16 GB profile is a thing to fix, with the model that does not fit named.
    out = io.StringIO()
    run_doctor(str(ROOT / "configs" / "workstation-16gb.yaml"), machine, out=out, memory_gib=11.7)
    assert "FIX   memory plan on the 11.7 GiB card: the models need 13.2 GiB together" in out.getvalue()


def test_docs_gpu_prints_the_current_plans_of_the_workstation_profiles():
    from serve_app.doctor import workstation_plans

    text = (ROOT / "docs" / "gpu.md").read_text()
    shown = text.split("<!-- workstation-plans:begin -->\n", 1)[1].split("<!-- workstation-plans:end -->", 1)[0]
    assert shown.strip() == workstation_plans().strip(), "regenerate: python -m serve_app.doctor"


def test_download_plans_the_gguf_file_a_profile_names():
    from serve_app.weights import plan

    repos = plan(app_args_from_config(ROOT / "configs" / "workstation-16gb.yaml"))
    files = [(repo.source.source, repo.source.filename) for repo in repos if repo.source.layout == "file"]
    assert ("city96/FLUX.1-schnell-gguf", "flux1-schnell-Q4_0.gguf") in files
