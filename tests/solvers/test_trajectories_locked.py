"""Trajectories locked bit for bit: every solver's float64 minibatch losses on NumPy, recorded from
the code before the structural redesign (one pass engine, Kronecker solvers on the block operator,
the Newton-CG base). A refactor that changes any bit of any loss fails here.

To re-record after a deliberate change of numerics: ``python -m tests.solvers.test_trajectories_locked``
prints the table below; say why in the commit.
"""

from __future__ import annotations

import numpy
import pytest

from engine.conv import Conv2d, Flatten, MaxPool2d, Unflatten
from engine.layers import Dense, ReLU, Tanh
from engine.model import Model
from nets import mlp
from solvers import make_solver

STEPS = 12


def _mlp_problem():
    model = mlp([16, 10, 6, 10, 16], ["tanh", "relu", "tanh", "linear"], "sigmoid_xent", weight_decay=1e-4, name="lock-ae")
    rng = numpy.random.default_rng(7)
    x = rng.random((4, 40, 16))
    return model, [(b, b) for b in x]


def _cnn_problem():
    layers = [Unflatten((1, 8, 8)), Conv2d(1, 3, 3, padding=1), ReLU(), MaxPool2d(2), Conv2d(3, 2, 3), Tanh(),
              Flatten(), Dense(8, 3)]
    model = Model(layers, "softmax_xent", weight_decay=1e-4, input_shape=(64,), name="lock-cnn")
    rng = numpy.random.default_rng(8)
    x = rng.standard_normal((3, 16, 64))
    y = rng.integers(0, 3, size=(3, 16))
    return model, list(zip(x, y))


CASES = {
    "kbfgs/mlp": ("kbfgs", _mlp_problem, {"lr": 0.3, "damping": 0.3}),
    "kbfgs_l/mlp": ("kbfgs_l", _mlp_problem, {"lr": 0.3, "damping": 0.3, "memory": 5}),
    "kfac/mlp": ("kfac", _mlp_problem, {"lr": 0.2, "damping": 0.3, "inverse_freq": 3}),
    "adam/mlp": ("adam", _mlp_problem, {"lr": 1e-2}),
    "newton_krylov/mlp": ("newton_krylov", _mlp_problem, {}),
    "hessian_free/mlp": ("hessian_free", _mlp_problem, {}),
    "kbfgs/cnn": ("kbfgs", _cnn_problem, {"lr": 1.0, "damping": 0.3}),
    "kbfgs_l/cnn": ("kbfgs_l", _cnn_problem, {"lr": 1.0, "damping": 0.3, "memory": 4}),
    "kfac/cnn": ("kfac", _cnn_problem, {"lr": 0.3, "damping": 0.1, "inverse_freq": 3}),
    # the baselines of issue 19, every hyper-parameter a tuning could move given explicitly
    "shampoo/mlp": ("shampoo", _mlp_problem, {"lr": 1e-2, "precondition_every": 3}),
    "shampoo/cnn": ("shampoo", _cnn_problem, {"lr": 1e-2, "precondition_every": 3}),
    "soap/mlp": ("soap", _mlp_problem, {"lr": 1e-2, "precondition_frequency": 3}),
    "soap/cnn": ("soap", _cnn_problem, {"lr": 1e-2, "precondition_frequency": 3}),
    "muon/mlp": ("muon", _mlp_problem, {"lr": 1e-2, "adam_lr": 1e-2}),
    "muon/cnn": ("muon", _cnn_problem, {"lr": 1e-2, "adam_lr": 1e-2}),
    "adahessian/mlp": ("adahessian", _mlp_problem, {"lr": 0.1, "beta1": 0.9, "beta2": 0.999, "eps": 1e-4}),
    "adahessian/cnn": ("adahessian", _cnn_problem, {"lr": 0.1, "beta1": 0.9, "beta2": 0.999, "eps": 1e-4}),
    "sophia/mlp": ("sophia", _mlp_problem, {"lr": 1e-2, "beta1": 0.965, "beta2": 0.99, "gamma": 0.01, "hessian_every": 3}),
    "sophia/cnn": ("sophia", _cnn_problem, {"lr": 1e-2, "beta1": 0.965, "beta2": 0.99, "gamma": 0.01, "hessian_every": 3}),
}


def trajectory(case: str) -> list[str]:
    """The float64 losses (as exact hex) of STEPS steps from the default seed, warm start included."""
    name, problem, hyper = CASES[case]
    model, batches = problem()
    params = model.init(dtype=numpy.float64, xp=numpy)
    solver = make_solver(name, model, **hyper)
    state = solver.init(params)
    if solver.needs_warm_start:
        state = solver.warm_start(params, state, iter(batches))
    out = []
    for k in range(STEPS):
        x, y = batches[k % len(batches)]
        params, state, info = solver.step(params, state, x, y)
        out.append(float(info["loss"]).hex())
    out.append(float(model.loss(params, *batches[0])).hex())  # where it ended
    return out


LOCKED = {
    'adahessian/cnn': [
        '0x1.1dba709ef2988p+0', '0x1.1621d157818a5p+0', '0x1.26c6db3fa00b2p+0',
        '0x1.17c075f6a05adp+0', '0x1.eea749816a974p-1', '0x1.fce27c20a6655p-1',
        '0x1.097f5b1013e13p+0', '0x1.05d33280981cep+0', '0x1.d08ab315e1346p-1',
        '0x1.00df7cc6e60d1p+0', '0x1.efea552327dc2p-1', '0x1.c508a9f0d7602p-1',
        '0x1.f180a2959733ep-1',
    ],
    'adahessian/mlp': [
        '0x1.6d4d10c966ba6p+3', '0x1.682cbad51ee64p+3', '0x1.66ac1c060eb1ap+3',
        '0x1.63267c4c243d0p+3', '0x1.62cbc75d6feaep+3', '0x1.62665d0cb2ae1p+3',
        '0x1.6208037d9d489p+3', '0x1.61d003802b991p+3', '0x1.6100a8eb8d7e5p+3',
        '0x1.619f34602dadap+3', '0x1.612634b5f5f5ap+3', '0x1.6173a826f68c5p+3',
        '0x1.60097b24af8e9p+3',
    ],
    'adam/mlp': [
        '0x1.6d4d10c966ba6p+3', '0x1.67a761b478cecp+3', '0x1.65f833b969e16p+3',
        '0x1.6543f643875b6p+3', '0x1.670dbac02c60ep+3', '0x1.6406e874aed93p+3',
        '0x1.62f0369ca4469p+3', '0x1.6273fd9d95129p+3', '0x1.633e2be71cc06p+3',
        '0x1.626e53d9bff80p+3', '0x1.6197ef26ea770p+3', '0x1.610bb117c6214p+3',
        '0x1.60ebda31ce969p+3',
    ],
    'hessian_free/mlp': [
        '0x1.6d4d10c966ba6p+3', '0x1.68ad0b3046c44p+3', '0x1.67e74f6f1a291p+3',
        '0x1.67ebc6bfc72afp+3', '0x1.6ba61dcc4361ap+3', '0x1.66f5f52b41771p+3',
        '0x1.65c9abdfed5e8p+3', '0x1.65491f543ec98p+3', '0x1.6712daa611820p+3',
        '0x1.63b1d63ca5892p+3', '0x1.62f86469b70eep+3', '0x1.629187b5986c7p+3',
        '0x1.62e7bd7c95869p+3',
    ],
    'kbfgs/cnn': [
        '0x1.1dba709ef2988p+0', '0x1.2638a3cfdf473p+0', '0x1.15acd5a371a61p+0',
        '0x1.11c0059c44e32p+0', '0x1.1880620b66ff2p+0', '0x1.ee0f5ed02d912p-1',
        '0x1.04976d9a54cb8p+0', '0x1.129cb9bbda746p+0', '0x1.bafb45ebb06dcp-1',
        '0x1.ff9193de577dap-1', '0x1.121c1e28e9e4cp+0', '0x1.9f33b1f598486p-1',
        '0x1.dc8b50e2149a3p-1',
    ],
    'kbfgs/mlp': [
        '0x1.6d4d10c966ba6p+3', '0x1.68bbe8410871cp+3', '0x1.67c312f6cbec8p+3',
        '0x1.67900d4673113p+3', '0x1.6ad568962c294p+3', '0x1.6685ca977a93cp+3',
        '0x1.655dce67ab450p+3', '0x1.65059f93fc42cp+3', '0x1.66e9b064cb07dp+3',
        '0x1.643150bde3167p+3', '0x1.634291deef58fp+3', '0x1.631dad5365aa1p+3',
        '0x1.63d281108fac4p+3',
    ],
    'kbfgs_l/cnn': [
        '0x1.1dba709ef2988p+0', '0x1.2638a3cfdf473p+0', '0x1.15acd5a371a61p+0',
        '0x1.11c0059c44e32p+0', '0x1.1880620b66ff1p+0', '0x1.ee0f5ed02d913p-1',
        '0x1.04b1c1e0350f4p+0', '0x1.1094b834b6cdfp+0', '0x1.b7ebb826ba041p-1',
        '0x1.fcab6c9f9aefap-1', '0x1.0a774de4d82acp+0', '0x1.94bc93228c6a5p-1',
        '0x1.c154c4ffc8039p-1',
    ],
    'kbfgs_l/mlp': [
        '0x1.6d4d10c966ba6p+3', '0x1.68bbe8410871cp+3', '0x1.67c312f6cbec9p+3',
        '0x1.67900d4673113p+3', '0x1.6ad568962c294p+3', '0x1.6685ca977a93cp+3',
        '0x1.655dce67ab450p+3', '0x1.65053f6a87eeap+3', '0x1.66e8e12f505d8p+3',
        '0x1.642ff570bcaf1p+3', '0x1.633fc7c76aca8p+3', '0x1.6318827f4ad7ep+3',
        '0x1.63cca046775a7p+3',
    ],
    'kfac/cnn': [
        '0x1.1dba709ef2988p+0', '0x1.2622d46ca287cp+0', '0x1.18cac15620fadp+0',
        '0x1.171e4408c94fep+0', '0x1.1e839ae0e872fp+0', '0x1.0b3a02aa44212p+0',
        '0x1.0bf4018c8d2f9p+0', '0x1.1317e373f7102p+0', '0x1.eec56c1e4ff6cp-1',
        '0x1.feb1b12e32907p-1', '0x1.057f157727e29p+0', '0x1.c29865f594e47p-1',
        '0x1.e35e5d43278ecp-1',
    ],
    'kfac/mlp': [
        '0x1.6d4d10c966ba6p+3', '0x1.68c0a3398906bp+3', '0x1.67f9728c73379p+3',
        '0x1.68048d5c633dep+3', '0x1.6be4b0b569779p+3', '0x1.677dbba8ec397p+3',
        '0x1.668633b1ea38dp+3', '0x1.665f3a9b07479p+3', '0x1.69673a0754edep+3',
        '0x1.65c4f380b1796p+3', '0x1.64d0803d910f1p+3', '0x1.64a168d951206p+3',
        '0x1.66daefd796774p+3',
    ],
    'muon/cnn': [
        '0x1.1dba709ef2988p+0', '0x1.24bcf7137cd1bp+0', '0x1.16b2e3cd09033p+0',
        '0x1.1989645a69badp+0', '0x1.1f2e0f528a3d6p+0', '0x1.10670f3cede7ep+0',
        '0x1.15e4a9491e7a6p+0', '0x1.1a6295aa469bdp+0', '0x1.0ad7dc1bc47c0p+0',
        '0x1.12c781db34fe6p+0', '0x1.1656e8ec9ac8ap+0', '0x1.05c0ab12f50afp+0',
        '0x1.101dc3870a2b4p+0',
    ],
    'muon/mlp': [
        '0x1.6d4d10c966ba6p+3', '0x1.684c71e5cd028p+3', '0x1.671a9d76e9083p+3',
        '0x1.66cb17baa7dccp+3', '0x1.69f27baa573adp+3', '0x1.66203a22d1a33p+3',
        '0x1.6525345134a2fp+3', '0x1.64e762c01c568p+3', '0x1.6767b2a8ddbf2p+3',
        '0x1.649bad98214c6p+3', '0x1.63d310490475ep+3', '0x1.639884a268b2dp+3',
        '0x1.65871fe9fc5d2p+3',
    ],
    'newton_krylov/mlp': [
        '0x1.6d4d10c966ba6p+3', '0x1.64fd9a75902aep+3', '0x1.63b0aced7f57fp+3',
        '0x1.630ec4c2c5a4cp+3', '0x1.63485aee6c567p+3', '0x1.6371468e7d132p+3',
        '0x1.63d07f1cbaf51p+3', '0x1.60179e01668eep+3', '0x1.62692f950403cp+3',
        '0x1.6166c2653610bp+3', '0x1.630a2174aba49p+3', '0x1.5fc40fce0d079p+3',
        '0x1.60ad8a467595ep+3',
    ],
    'shampoo/cnn': [
        '0x1.1dba709ef2988p+0', '0x1.224304e277b68p+0', '0x1.0f5abfad3ffbep+0',
        '0x1.10779dcd348f0p+0', '0x1.14a55d8363fadp+0', '0x1.07f13402fc686p+0',
        '0x1.0b0bb8d83e3bcp+0', '0x1.0f0de5bc2c8b9p+0', '0x1.fa0c440d23600p-1',
        '0x1.06e3c83c1aa7fp+0', '0x1.0ae75eb19ee32p+0', '0x1.e9413bff105c2p-1',
        '0x1.04053e7ffba08p+0',
    ],
    'shampoo/mlp': [
        '0x1.6d4d10c966ba6p+3', '0x1.67a6580bc5510p+3', '0x1.65ef9f46e5c5bp+3',
        '0x1.65496ea2d09cbp+3', '0x1.675ccd193fc25p+3', '0x1.646cecdf7383ap+3',
        '0x1.63478e9321ffdp+3', '0x1.6265693d43e21p+3', '0x1.63b1ece06f3f3p+3',
        '0x1.6261acf6ac945p+3', '0x1.6142f877c519bp+3', '0x1.606d1119689f9p+3',
        '0x1.60b029a79abc7p+3',
    ],
    'soap/cnn': [
        '0x1.1dba709ef2988p+0', '0x1.26068f59ef134p+0', '0x1.1c5444024b0ffp+0',
        '0x1.1d665f1847faap+0', '0x1.15a1a90612bc3p+0', '0x1.1001b4a8ef4dfp+0',
        '0x1.19e6df52a81a3p+0', '0x1.0f32acba7a0ffp+0', '0x1.067e0ed5c035bp+0',
        '0x1.16b46defebba9p+0', '0x1.0a4112674dabcp+0', '0x1.fc9c4a7f769ecp-1',
        '0x1.1400dd62714a0p+0',
    ],
    'soap/mlp': [
        '0x1.6d4d10c966ba6p+3', '0x1.68e2eb298a851p+3', '0x1.678fa639e648bp+3',
        '0x1.673740ea7f773p+3', '0x1.6a6c10e095ea6p+3', '0x1.65807d2031cb3p+3',
        '0x1.64c7c586527b8p+3', '0x1.648369c043bedp+3', '0x1.66f84af18d888p+3',
        '0x1.635fe624e0737p+3', '0x1.62e0d6015fabep+3', '0x1.6277624bad75ap+3',
        '0x1.643b46bdf43e6p+3',
    ],
    'sophia/cnn': [
        '0x1.1dba709ef2988p+0', '0x1.22430476443a5p+0', '0x1.0fbcf4c6c05c2p+0',
        '0x1.1086bde5b7335p+0', '0x1.0ed0e64c65613p+0', '0x1.01ee01200f690p+0',
        '0x1.0e7a083cfd8fbp+0', '0x1.09a8f9021fc7cp+0', '0x1.e2388597be967p-1',
        '0x1.10a12ec5f03c2p+0', '0x1.0ee9b8e0baccbp+0', '0x1.c028fa8906e9dp-1',
        '0x1.100ea650c269cp+0',
    ],
    'sophia/mlp': [
        '0x1.6d4d10c966ba6p+3', '0x1.67a69080f66f8p+3', '0x1.65d3745cc2cddp+3',
        '0x1.6510949c8d9dap+3', '0x1.667f6dea58e8fp+3', '0x1.63dc7fff76aabp+3',
        '0x1.62d6505682472p+3', '0x1.62860cf9a085fp+3', '0x1.62d30f2c0ade4p+3',
        '0x1.62c021a7d7efbp+3', '0x1.623cf7cd3a9c3p+3', '0x1.61a256e324b4ap+3',
        '0x1.60c2594fd7bb0p+3',
    ],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_trajectory_is_unchanged_bit_for_bit(case):
    assert trajectory(case) == LOCKED[case]


if __name__ == "__main__":  # pragma: no cover - re-recording
    for case in sorted(CASES):
        print(f"    {case!r}: [")
        losses = trajectory(case)
        for i in range(0, len(losses), 3):
            print("        " + " ".join(f"{v!r}," for v in losses[i:i + 3]))
        print("    ],")
