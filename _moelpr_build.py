"""Build step shipping ``moelpr-startup.pth`` into site-packages (wheel and editable installs)."""

import os

from setuptools.command.build_py import build_py

STARTUP_HOOK = "moelpr-startup.pth"


class BuildPyWithStartupHook(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(STARTUP_HOOK, os.path.join(self._hook_dir(), STARTUP_HOOK), preserve_mode=False)

    def _hook_dir(self) -> str:
        if getattr(self, "editable_mode", False):
            # An editable wheel links the sources and ships only what lies in its root (install_lib).
            return self.get_finalized_command("install").install_lib
        return self.build_lib

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        if getattr(self, "editable_mode", False):
            return outputs
        return [*outputs, os.path.join(self.build_lib, STARTUP_HOOK)]
