"""The library's public names come from the package itself, and importing it stays light."""

import subprocess
import sys

import pytest

import ovml_core


@pytest.mark.parametrize("name", ovml_core.__all__)
def test_public_name_is_the_object_its_module_defines(name):
    module = __import__(ovml_core._EXPORTS[name], fromlist=[name])
    assert getattr(ovml_core, name) is getattr(module, name)


def test_all_lists_every_export():
    assert sorted(ovml_core.__all__) == sorted(ovml_core._EXPORTS)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        _ = ovml_core.no_such_thing


def test_importing_the_config_does_not_load_the_model_stack():
    code = (
        "import sys, ovml_core.config; "
        "print(sorted(m for m in ('open_clip', 'transformers', 'av', 'ray') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_every_job_exits_through_one_runner_with_the_same_codes(capsys, tmp_path):
    from ovml_core.config import ConfigError
    from pipeline.cli import EXIT_NO_PROGRESS, EXIT_USAGE, run_job
    from pipeline.compaction import main as compact_main
    from pipeline.progress import NoProgressError

    def raising(err):
        def body():
            raise err

        return body

    assert run_job(lambda: 7) == 7
    assert run_job(raising(ConfigError("tag.threshold: bad"))) == EXIT_USAGE
    assert capsys.readouterr().err.strip() == "error: tag.threshold: bad"
    assert run_job(raising(NoProgressError("stalled"))) == EXIT_NO_PROGRESS
    assert run_job(raising(KeyError("x")), usage_errors=(KeyError,)) == EXIT_USAGE
    with pytest.raises(RuntimeError):  # a bug is not a usage error: it surfaces
        run_job(raising(RuntimeError("bug")))
    # A job's own usage error goes through the same runner: compacting what is no tags folder.
    assert compact_main([str(tmp_path / "missing")]) == EXIT_USAGE
    assert capsys.readouterr().err.startswith("error: ")
