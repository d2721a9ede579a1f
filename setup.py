"""Installs ``surm-peft-hook.pth`` beside the package (the metadata is in pyproject.toml).

Python's ``site`` executes the ``import`` lines of every ``.pth`` file in ``site-packages`` at
start-up. The one line below arms SURM's registration with PEFT for the moment PEFT is imported
(see the module ``_surm_peft_hook``), so an adapter saved by surm loads with
``PeftModel.from_pretrained`` / ``AutoPeftModel*`` in a program that never imports surm. The file
is written by ``build_py``, into the wheel's root (``pip install .``) or, for an editable
install (``pip install -e .``), into the editable wheel.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "surm-peft-hook.pth"
# a finder that answers only for ``peft`` and then hands over to _surm_peft_hook.find_peft; it
# imports nothing at start-up (os and sys are loaded before any .pth file is read); once, though
# site may read the file twice (a virtual environment's lib64 is a link to lib)
PTH_LINE = (
    "import os, sys; os.environ.get('SURM_NO_PEFT_HOOK') "
    "or any(type(f).__name__ == 'SurmPeftStartupHook' for f in sys.meta_path) "
    "or sys.meta_path.insert(0, type('SurmPeftStartupHook', (), "
    "{'find_spec': staticmethod(lambda name, path=None, target=None: "
    "__import__('_surm_peft_hook').find_peft(name, path, target) if name == 'peft' else None)})())\n"
)


class BuildPyWithStartupHook(build_py):
    def run(self) -> None:
        super().run()
        # an editable build writes modules nowhere (they stay in src/); what the wheel holds
        # besides them goes to the install command's library folder, the unpacked wheel
        folder = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        Path(folder, PTH_NAME).write_text(PTH_LINE)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib, PTH_NAME))]


setup(cmdclass={"build_py": BuildPyWithStartupHook})
