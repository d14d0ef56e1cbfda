from pathlib import Path

import pytest

from browservm.errors import CommandFailed
from browservm.runner import CommandRunner


def test_output_returns_stdout_and_feeds_stdin() -> None:
    assert CommandRunner().output(["tr", "a-z", "A-Z"], input=b"kernel") == b"KERNEL"


def test_a_non_zero_exit_is_an_error_with_status_and_stderr() -> None:
    with pytest.raises(CommandFailed) as caught:
        CommandRunner().output(["sh", "-c", "echo fine; echo broken >&2; exit 3"])
    assert (caught.value.returncode, caught.value.detail) == (3, "broken")
    assert str(caught.value).startswith("sh -c 'echo fine; echo broken >&2; exit 3': exited with status 3")


def test_a_missing_program_is_an_error_pointing_at_the_install_script() -> None:
    with pytest.raises(CommandFailed, match=r"not found: scripts/install\.sh installs it") as caught:
        CommandRunner().output(["browservm-no-such-program"])
    assert caught.value.returncode is None


def test_logged_appends_everything_and_a_failure_shows_the_end_and_the_log(tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    runner = CommandRunner()
    runner.logged(["sh", "-c", "echo first"], log=log, env={"UNUSED": "1"})
    with pytest.raises(CommandFailed) as caught:
        runner.logged(["sh", "-c", "for i in $(seq 1 100); do echo line $i; done; echo oops >&2; exit 2"],
                      log=log, cwd=tmp_path)
    error = caught.value
    assert (error.returncode, error.log) == (2, str(log))
    assert error.detail.splitlines()[-1] == "oops" and len(error.detail.splitlines()) == 25
    assert f"(full log: {log})" in str(error)
    text = log.read_text()
    assert text.startswith("\n$ sh -c 'echo first'\nfirst\n") and "line 1\n" in text


def test_logged_passes_extra_environment(tmp_path: Path) -> None:
    log = tmp_path / "log"
    CommandRunner().logged(["sh", "-c", 'echo "user=$KBUILD_BUILD_USER"'], log=log,
                           env={"KBUILD_BUILD_USER": "browservm"})
    assert "user=browservm" in log.read_text()
