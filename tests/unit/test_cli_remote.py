"""The remote CLI commands' exit codes that need no running service: usage errors (2) are caught
before sending, and a service that does not answer is 3."""

import pytest

from serve_app.cli import main
from tests.helpers import free_port


def test_a_field_the_schema_refuses_is_a_usage_error_naming_it(capsys):
    assert main(["generate", "a fox", "--size", "100x100", "--url", f"http://127.0.0.1:{free_port()}"]) == 2
    assert "width" in capsys.readouterr().err


def test_a_bad_size_or_output_format_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["generate", "a fox", "--size", "big"])
    assert caught.value.code == 2
    still = tmp_path / "still.png"
    still.write_bytes(b"not read before the check")
    assert main(["animate", str(still), "-o", str(tmp_path / "clip.avi")]) == 2
    assert ".mp4, .gif, .webp" in capsys.readouterr().err


def test_an_unreachable_service_is_exit_3(capsys):
    assert main(["jobs", "list", "--url", f"http://127.0.0.1:{free_port()}"]) == 3
    assert "unreachable" in capsys.readouterr().err


def test_animate_needs_an_image_or_a_prompt_and_checks_interpolate(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["animate", "-o", str(tmp_path / "clip.mp4"), "--url", url]) == 2
    assert "give IMAGE to animate, or --prompt for text-to-video" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:
        main(["animate", "--prompt", "waves", "--interpolate", "3", "--url", url])
    assert caught.value.code == 2
    # Text-to-video is a valid request: it gets as far as the (unreachable) service.
    assert main(["animate", "--prompt", "waves", "--model", "ltx-video", "--interpolate", "2", "--url", url]) == 3
