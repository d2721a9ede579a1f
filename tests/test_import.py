"""``import surm``: instant (no torch, PEFT or transformers), and SURM is registered with PEFT
whenever PEFT is imported, before or after surm, in any spelling."""

import subprocess
import sys

import pytest

REGISTERED = "from peft import mapping; assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING['SURM'].__name__ == 'SurmConfig'"


def _python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_import_surm_imports_nothing_heavy():
    out = _python("import sys, surm; print(sorted(m for m in ('torch', 'peft', 'transformers', 'numpy') "
                  "if m in sys.modules), surm.__version__)")
    heavy, version = out.rsplit(" ", 1)
    assert heavy == "[]" and version.strip() == "0.1.0"


HOOK_GONE = ("import sys; assert type(peft.__loader__).__name__ == type(peft.__spec__.loader).__name__ == "
             "'SourceFileLoader'; "
             "assert not [f for f in sys.meta_path if type(f).__module__ == '_surm_peft_hook' "
             "or type(f).__name__ == 'SurmPeftStartupHook']")


@pytest.mark.parametrize("code", [
    # surm first: registered when peft is imported; peft keeps its own loader and the hook goes
    f"import surm; import peft; {REGISTERED}; {HOOK_GONE}",
    f"import peft; import surm; {REGISTERED}",  # peft first: registered at once
    f"import peft; {REGISTERED}; {HOOK_GONE}",  # no surm at all: the start-up hook installed with the package
    f"import surm; from peft import PeftModel; {REGISTERED}",
    f"import surm; import peft.tuners.lora; {REGISTERED}",  # a submodule imports peft's __init__ first
    # asking whether peft is installed does not import it, nor break the later import
    "import sys, surm, importlib.util; assert importlib.util.find_spec('peft'); assert 'peft' not in sys.modules; "
    f"import peft; {REGISTERED}",
])
def test_surm_is_registered_with_peft_whatever_the_order(code):
    _python(code)


def test_the_public_names_load_on_first_use():
    out = _python("import sys, surm; c = surm.SurmConfig(structure='circulant'); "
                  "print(type(c).__module__, surm.SurmModel.__name__, 'circulant' in surm.structured.names(), "
                  "'peft' in sys.modules)")
    assert out.split() == ["surm.peft.config", "SurmModel", "True", "True"]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import surm

        surm.nope  # noqa: B018


def test_a_failed_registration_warns_and_leaves_import_peft_working():
    out = _python(
        "import warnings, surm, _surm_peft_hook as hook\n"
        "def broken(): raise RuntimeError('unsupported peft')\n"
        "hook._register = broken\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import peft\n"
        "from peft import PeftModel, LoraConfig\n"
        "print([str(w.message) for w in caught if 'surm could not register' in str(w.message)])"
    )
    assert "RuntimeError('unsupported peft')" in out
