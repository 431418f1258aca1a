"""One LeNet-5 forward+backward pass (mnist-cnn), cstep against PyTorch, interleaved.

Issue 21 goal: <= 1.0x PyTorch's pass (batch 128, float32, one thread). The same network on both
sides (conv5x5(6, padding 2), ReLU, maxpool 2, conv5x5(16), ReLU, maxpool 2, 400-120-84-10 with
ReLU, softmax cross-entropy, mean over the batch): cstep's ``model.loss_and_grad`` against
``loss.backward()`` of the equivalent ``torch.nn`` module (weights copied from cstep's), timed in
rounds (cstep, torch, cstep, torch, ...) in process CPU time and wall time; medians. torch is a
benchmark-only dependency.

    python benchmarks/cnn_pass.py [--batch 128] [--repeat 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy
from threadpoolctl import threadpool_info, threadpool_limits

import nets


def torch_lenet(model, params):
    import torch  # noqa: PLC0415 (benchmark-only dependency)

    net = torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 28, 28)), torch.nn.Conv2d(1, 6, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(6, 16, 5), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
        torch.nn.Linear(400, 120), torch.nn.ReLU(), torch.nn.Linear(120, 84), torch.nn.ReLU(), torch.nn.Linear(84, 10))
    with torch.no_grad():
        for p, q in zip([p for p in net.parameters()], params):
            p.copy_(torch.as_tensor(numpy.asarray(q)))
    return net


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import torch  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    model = nets.build("mnist-cnn")
    params = model.init(seed=1, dtype=numpy.float32, xp=numpy)
    rng = numpy.random.default_rng(0)
    x = rng.random((args.batch, 784)).astype(numpy.float32)
    y = rng.integers(0, 10, args.batch)
    net = torch_lenet(model, params)
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)

    def cstep_pass():
        return model.loss_and_grad(params, x, y, regularized=False)  # torch side has no weight decay

    def torch_pass():
        net.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(net(xt), yt)
        loss.backward()
        return loss

    with threadpool_limits(limits=args.threads, user_api="blas"):
        blas = ", ".join(f"{p['internal_api']} {p['version']} x{p['num_threads']}" for p in threadpool_info() if p["user_api"] == "blas")
        print(f"mnist-cnn (LeNet-5) forward+backward, batch {args.batch}, float32; BLAS: {blas}; torch {torch.__version__} "
              f"x{torch.get_num_threads()}; loadavg(before)={os.getloadavg()[0]:.2f}")
        loss_c = float(cstep_pass()[0])
        loss_t = float(torch_pass().detach())
        fns = {"cstep": cstep_pass, "torch": torch_pass}
        wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
        for f in fns.values():
            f()
        for _ in range(args.repeat):
            for k, f in fns.items():
                c0, w0 = time.process_time(), time.perf_counter()
                f()
                cpu[k].append(time.process_time() - c0)
                wall[k].append(time.perf_counter() - w0)
    med = {k: (statistics.median(cpu[k]) * 1e3, statistics.median(wall[k]) * 1e3) for k in fns}
    print(f"loss: cstep {loss_c:.6f}, torch {loss_t:.6f} (same weights and batch)")
    for k in fns:
        print(f"{k:6s}: CPU {med[k][0]:7.2f} ms   wall {med[k][1]:7.2f} ms")
    print(f"cstep / torch: CPU {med['cstep'][0] / med['torch'][0]:.2f}, wall {med['cstep'][1] / med['torch'][1]:.2f} "
          f"(goal <= 1.0); threads={args.threads} loadavg(after)={os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
