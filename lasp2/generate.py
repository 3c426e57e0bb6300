"""python -m lasp2.generate --resume <run dir> --prompt "..." --max-new-tokens N

Continues a prompt with a trained run's newest checkpoint (`lasp2.generation`): one process, or
`torchrun --nproc-per-node W -m lasp2.generate ...` to prefill the prompt across W ranks. The
function is `lasp2.generate` (defined in `lasp2.generation`).
"""
import sys

from lasp2.generation import main

if __name__ == "__main__":
    sys.exit(main())
