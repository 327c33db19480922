"""The performance lab: what one training step costs and why.

bench.py    eager vs compile vs trace vs script vs export timings (`nnperf bench`)
profile.py  one warmed-up step under NVTX ranges and torch.profiler (`nnperf profile`)
peak.py     this device's measured peak FLOP/s and memory bandwidth, cached (`nnperf peak`)
flops.py    FLOPs of a training step (FlopCounterMode) and MFU
policy.py   precision x memory format chosen by timing the candidates (`--policy measured`)
step_roofline.py  a run's training step (or one timed here) on the measured roof (`nnperf roofline`)
cache.py    the per-device cache of measurements

Imports go one way: peak, flops, policy and cache import nothing from nnperf.train (the training
loop uses them); bench and profile drive training steps and may. The graph modes themselves
(`nnperf train --jit`, bench's modes) are nnperf.train.jit.
"""
