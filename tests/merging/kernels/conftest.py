"""Run the Triton kernels on CPU tensors through Triton's interpreter.

The kernels are built (decorated) when merging.kernels is imported, and the interpreter is chosen then: the
variable is set here, at collection, before any test module of this folder imports merging.kernels. If something
earlier in this pytest process imported merging.kernels without it, those modules are dropped so the import below
builds interpreted kernels. Triton itself may already be imported (peft imports it): the kernels call only Triton
builtins, which the interpreter patches at each launch.
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

for _name in [m for m in sys.modules if m == "merging.kernels" or m.startswith("merging.kernels.")]:
    del sys.modules[_name]
