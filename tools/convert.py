"""HF <-> Megatron checkpoint converter (the code is ``hpt_megatron.convert``; ``hpt convert``
runs the same).

    python tools/convert.py hf-to-megatron --hf HF_DIR --out MEGATRON_DIR [--dtype bf16]
    python tools/convert.py megatron-to-hf --load MEGATRON_DIR --out HF_DIR [--hf-config DIR]
"""

import sys

from hpt_megatron.convert import main

if __name__ == "__main__":
    sys.exit(main())
