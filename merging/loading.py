"""One lock for every transformers model load in this process.

transformers 5.x keeps the state of `from_pretrained` (its init and meta-device contexts) in module globals, so two
loads in two threads at once can leave it changed for the rest of the process. Measured: after two threads had
each loaded a tiny Llama three times, a tied SmolLM2 loaded next came out untied, its lm_head left on the meta
device (and could not be saved). The pipeline runs tasks in threads (Gram matrices, quantisation checks,
evaluation, GGUF import), so every load goes through this lock; what runs after the load runs side by side.
"""

import threading

LOAD_LOCK = threading.RLock()
