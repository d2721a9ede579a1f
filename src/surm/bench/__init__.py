"""Speed and memory benchmarks (run by hand or by ``surm bench``; never as timed tests).

All timings are medians of interleaved rounds measured in one process, reported as ratios
to a reference measured in the same run (the frozen base, and PEFT LoRA r=8).
"""
