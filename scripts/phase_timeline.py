"""Where a layer's time goes, from the raw per-task stamps `scripts/profile_megakernel.py --raw DIR` saves: per
phase of the given layers, the median counter sight, the median and last end and the median work, in µs from
the step's start (no GPU needed).

  python scripts/phase_timeline.py raw/llama-3.2-1b-b1-ctx512-default.npz --layers 5,6
"""
import argparse

import numpy as np

from monokernel.runtime.step_profile import phase_timeline


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("npz", nargs="+")
    ap.add_argument("--layers", default="0,1")
    args = ap.parse_args()
    layers = [int(x) for x in args.layers.split(",")]
    for path in args.npz:
        z = np.load(path)
        print(f"{path}: step {(z['stamps'][:, 2].max() - z['stamps'][:, 0].min()) / 1e3:.1f} us")
        print(f"  {'layer':>5} {'op':8} {'tasks':>5} {'sight':>8} {'med end':>8} {'last end':>8} {'med work':>8}")
        for r in phase_timeline(z["stamps"], z["records"], layers):
            print(f"  {r['layer']:5d} {r['op']:8} {r['tasks']:5d} {r['sight_us']:8.1f} {r['median_end_us']:8.1f}"
                  f" {r['last_end_us']:8.1f} {r['median_work_us']:8.1f}")


if __name__ == "__main__":
    main()
