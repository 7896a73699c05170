"""tools/make_helpdesk_exports.py, the realistic helpdesk export generator, loaded as a module (tools/ is not a
package): `generator().main([out, "--seed", "1"])`."""

from __future__ import annotations

import importlib.util

from support.runs import REPO


def generator():
    spec = importlib.util.spec_from_file_location("make_helpdesk_exports", REPO / "tools" / "make_helpdesk_exports.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
