"""The simulated accelerator, `device: sim:<profile>` (docs/simulator.md).

A simulated device measures the serving stack where no GPU is lent: the model call takes the time
the card would take, holds the memory the card would hold, and frees the CPU meanwhile.

- `deployments.sim_profiles`: the cards as data (`sim_profiles.yaml`: memory, dense bf16/fp8 TFLOPS, bandwidths, sources);
- `flops`: FLOPs and parameter counts of the published architectures (`deployments/architectures/`),
  counted once per component and shape on the meta device and cached;
- `timing`: the time of a call: FLOPs over the profile's peak and the acceleration tier's calibrated
  efficiency (`calibration.yaml`), plus a fixed cost per call;
- `memory`: the memory plan (weights, activations, CUDA context) and the per-GPU ledger;
- `pipeline`: the pipeline-like object a family's loaded model calls in place of a diffusers pipeline;
- `table`: the calibration table of docs/simulator.md (`python -m deployments.runtime.sim.table`).
"""
