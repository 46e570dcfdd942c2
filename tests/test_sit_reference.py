"""SiT and its transport: the reference vectors of the official code (tests/data/sit_tiny) reproduced,
and the transport's rules, losses and samplers beyond them."""

import json
from pathlib import Path

import pytest
import torch
from helpers.tolerance import LOOP_REL, assert_fp32_close

from models.dit import DiT_models
from models.sit import SiT, SiT_models
from transport import Sampler, create_transport
from transport.path import GVPCPlan, ICPlan, VPCPlan, expand_t_like_x

REFERENCE = Path(__file__).resolve().parent / "data" / "sit_tiny"
VP_CLAMP = (1e-5, 1 - 1e-5)  # the reference's VP times (README)
PATHS = {"Linear": ICPlan, "GVP": GVPCPlan, "VP": VPCPlan}


@pytest.fixture(scope="module")
def ref():
    """The reference inputs and outputs, and the tiny SiT with its weights (eval mode)."""
    from safetensors.torch import load_file

    config = json.loads((REFERENCE / "config.json").read_text())
    model = SiT(**config["model_config"])
    model.load_state_dict(torch.load(REFERENCE / "sit_tiny.pt", weights_only=True), strict=True)
    return {"e": load_file(str(REFERENCE / "expected.safetensors")), "config": config, "model": model.eval()}


def _times(e, path_type):
    return e["t"].clamp(*VP_CLAMP) if path_type == "VP" else e["t"]


def _close_but_vp_end(actual, expected, path_type):
    """Rows at interior times to float32 kernel rounding (helpers/tolerance.py); VP's last row (t = 1 - 1e-5,
    sigma about 1e-3, where the reference's 1 - exp(.) keeps few digits in float32) to 2% of its scale."""
    if path_type != "VP":
        assert_fp32_close(actual, expected)
        return
    assert_fp32_close(actual[:-1], expected[:-1])
    torch.testing.assert_close(actual[-1], expected[-1], atol=2e-2 * expected[-1].abs().max().item(), rtol=0)


def gaussian_oracle(path, mean, std, prediction):
    """The exact model when the data is N(mean, std^2 I): x_t = alpha x1 + sigma x0 is N(alpha mean, V I) with
    V = alpha^2 std^2 + sigma^2, and E[x0 | x_t] = sigma (x_t - alpha mean) / V (joint Gaussian)."""
    def model(x, t):
        te = expand_t_like_x(t, x)
        (alpha, d_alpha), (sigma, d_sigma) = path.compute_alpha_t(te), path.compute_sigma_t(te)
        var = alpha ** 2 * std ** 2 + sigma ** 2
        centred = x - alpha * mean
        return {"velocity": d_alpha * mean + (d_alpha * alpha * std ** 2 + d_sigma * sigma) * centred / var,
                "noise": sigma * centred / var, "score": -centred / var}[prediction]
    return model


#################################################################################
#                                The SiT model                                  #
#################################################################################

def test_forward_reproduces_reference(ref):
    e, model = ref["e"], ref["model"]
    assert model.arch == "SiT" and model.config["learn_sigma"]
    assert model.final_layer.linear.out_features == 2 * 2 * 8  # p * p * 2C: the official layout is kept
    with torch.no_grad():
        out = model(e["x1"], e["t"], e["y"])
    assert out.shape == e["x1"].shape  # the learned-sigma half is dropped
    assert_fp32_close(out, e["forward"])


@pytest.mark.parametrize("guide_all_channels", [False, True])
def test_forward_with_cfg_is_the_official_guidance(ref, guide_all_channels):
    e, model = ref["e"], ref["model"]
    x, t, y = e["x1"][:2], e["t"][1:3], e["y"][:2]
    null = torch.full_like(y, model.num_classes)
    with torch.no_grad():
        guided = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 4.0,
                                        guide_all_channels=guide_all_channels)
        cond, uncond = model(x, t, y), model(x, t, null)
    n = 4 if guide_all_channels else 3
    mix = uncond[:, :n] + 4.0 * (cond[:, :n] - uncond[:, :n])
    assert guided.shape == (4, 4, 8, 8)
    assert_fp32_close(guided[:2, :n], mix)
    assert_fp32_close(guided[2:, :n], mix)
    assert_fp32_close(guided[:2, n:], cond[:, n:])  # unguided channels pass through
    assert_fp32_close(guided[2:, n:], uncond[:, n:])


def test_sit_without_learned_sigma_returns_every_channel():
    torch.manual_seed(0)
    model = SiT(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=10, learn_sigma=False).eval()
    assert model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])).shape == (2, 4, 8, 8)


def test_registry_mirrors_dit():
    sized = {name: f for name, f in DiT_models.items() if hasattr(f, "fixed")}
    sit_sized = {name: f for name, f in SiT_models.items() if hasattr(f, "fixed")}
    assert set(sit_sized) == {"SiT" + name[len("DiT"):] for name in sized}
    assert {"SiT-XL-1-2", "SiT-XL-2-4", "SiT-XL-7-14", "SiT-D14-1-2"} <= set(SiT_models)  # gated presets
    for name, factory in sit_sized.items():
        assert factory.fixed == sized["DiT" + name[len("SiT"):]].fixed
    assert {"SiT-XL/2", "SiT-L/2", "SiT-B/2", "SiT-S/2", "SiT-S/4", "SiT-S/8", "SiT-D19/2", "SiT-D14/2",
            "SiT-D7/2", "SiT-Nano/2", "SiT-Ti/2"} <= set(SiT_models)
    assert SiT_models["SiT-D14/2"].fixed == dict(depth=14, hidden_size=1152, patch_size=2, num_heads=16)


def test_sit_s2_has_the_state_dict_of_dit_s2():
    sit, dit = SiT_models["SiT-S/2"](), DiT_models["DiT-S/2"]()
    assert isinstance(sit, SiT) and sit.arch == "SiT"
    sit_shapes = {k: v.shape for k, v in sit.state_dict().items()}
    assert sit_shapes == {k: v.shape for k, v in dit.state_dict().items()}
    sit.load_state_dict(dit.state_dict(), strict=True)


#################################################################################
#                           Paths and training losses                           #
#################################################################################

@pytest.mark.parametrize("path_type", list(PATHS))
def test_path_plan_reproduces_reference(ref, path_type):
    e = ref["e"]
    t, xt, ut = PATHS[path_type]().plan(_times(e, path_type), e["x0"], e["x1"])
    _close_but_vp_end(xt, e[f"{path_type}_xt"], path_type)
    _close_but_vp_end(ut, e[f"{path_type}_ut"], path_type)


def test_vp_end_is_accurate_in_float32():
    """Near t = 1, sigma_t^2 = -expm1(2 log alpha_t) keeps the float64 value's digits (1 - exp would not)."""
    t = torch.tensor([0.5, 1 - 1e-5, 1 - 1e-4])
    x0, x1 = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    _, xt, ut = VPCPlan().plan(t, x0.float(), x1.float())
    _, xt64, ut64 = VPCPlan().plan(t.double(), x0, x1)
    # Elementwise float32 formulas (no reductions, so no CPU-dependent summation order): a few ulps (1.2e-7 each)
    # of values of order 1; the velocity divides by a small sigma near t = 1, which scales its error up (1e-4).
    torch.testing.assert_close(xt.double(), xt64, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ut.double(), ut64, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("path_type", list(PATHS))
def test_velocity_loss_reproduces_reference(ref, path_type):
    e, model = ref["e"], ref["model"]
    transport = create_transport(path_type, "velocity")
    with torch.no_grad():
        terms = transport.training_losses(model, e["x1"], dict(y=e["y"]), t=_times(e, path_type), x0=e["x0"])
    assert terms["loss"].shape == (4,) and terms["pred"].shape == e["x1"].shape
    _close_but_vp_end(terms["loss"], e[f"{path_type}_velocity_loss"], path_type)


def test_drawn_training_times_lie_in_the_interval():
    torch.manual_seed(0)
    x1 = torch.randn(512, 2)
    for path_type, prediction, (lo, hi) in [("VP", "velocity", (0, 1 - 1e-5)), ("Linear", "noise", (1e-3, 1 - 1e-3)),
                                            ("GVP", "velocity", (0, 1))]:
        t, x0, same = create_transport(path_type, prediction).sample(x1)
        assert t.shape == (512,) and x0.shape == x1.shape and same is x1
        assert lo <= t.min() and t.max() <= hi and t.max() - t.min() > 0.9 * (hi - lo)


def test_explicit_times_are_checked():
    transport = create_transport("VP")
    x1 = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match=r"must lie in \[0, 0.99999\]"):
        transport.training_losses(lambda x, t: x, x1, t=torch.tensor([0.5, 1.0]), x0=torch.randn_like(x1))
    with pytest.raises(ValueError, match="shape"):
        transport.training_losses(lambda x, t: x, x1, t=torch.tensor([0.5]))
    with pytest.raises(ValueError, match="2C channels"):
        transport.training_losses(lambda x, t: torch.cat([x, x], 1), x1)


@pytest.mark.parametrize("path_type", list(PATHS))
@pytest.mark.parametrize("prediction", ["score", "noise"])
@pytest.mark.parametrize("loss_weight", [None, "velocity", "likelihood"])
def test_score_and_noise_losses(ref, path_type, prediction, loss_weight):
    e, model = ref["e"], ref["model"]
    transport = create_transport(path_type, prediction, loss_weight)
    t = torch.tensor([0.01, 0.3, 0.7, 0.99])
    with torch.no_grad():
        terms = transport.training_losses(model, e["x1"], dict(y=e["y"]), t=t, x0=e["x0"])
        drawn = transport.training_losses(model, e["x1"], dict(y=e["y"]))
    for loss in (terms["loss"], drawn["loss"]):
        assert loss.shape == (4,) and torch.isfinite(loss).all()
    # The weighted objective by hand (SiT's score target is -x0 / sigma_t, i.e. sigma_t s + x0 = 0).
    p = PATHS[path_type]()
    xt = p.compute_xt(t, e["x0"], e["x1"])
    sigma = p.compute_sigma_t(expand_t_like_x(t, xt))[0]
    drift_var = p.compute_drift(xt, t)[1]
    weight = {None: 1, "velocity": (drift_var / sigma) ** 2, "likelihood": drift_var / sigma ** 2}[loss_weight]
    residual = terms["pred"] - e["x0"] if prediction == "noise" else terms["pred"] * sigma + e["x0"]
    torch.testing.assert_close(terms["loss"], (weight * residual ** 2).mean(dim=(1, 2, 3)))


@pytest.mark.parametrize("path_type", list(PATHS))
def test_conversions_between_velocity_score_and_noise(path_type):
    p = PATHS[path_type]()
    torch.manual_seed(0)
    t, x0, x1 = torch.tensor([0.2, 0.5, 0.8]), torch.randn(3, 5), torch.randn(3, 5)
    _, xt, ut = p.plan(t, x0, x1)
    sigma = p.compute_sigma_t(expand_t_like_x(t, xt))[0]
    # With a single data point the conditional fields are the true ones. Two or three elementwise float32 operations
    # (no reductions) on values of order 1 to 10 (the score divides by sigma >= 0.2): 1e-5 is about 10 ulps of them.
    torch.testing.assert_close(p.get_noise_from_velocity(ut, xt, t), x0, atol=1e-5, rtol=1e-5)
    score = p.get_score_from_velocity(ut, xt, t)
    torch.testing.assert_close(score, -x0 / sigma, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p.get_velocity_from_score(score, xt, t), ut, atol=1e-5, rtol=1e-5)


#################################################################################
#                                  The eps rules                                #
#################################################################################

@pytest.mark.parametrize("path_type, prediction, eps", [
    ("VP", "velocity", (1e-5, 1e-3)), ("VP", "noise", (1e-5, 1e-3)), ("VP", "score", (1e-5, 1e-3)),
    ("Linear", "velocity", (0, 0)), ("GVP", "velocity", (0, 0)),
    ("Linear", "noise", (1e-3, 1e-3)), ("Linear", "score", (1e-3, 1e-3)), ("GVP", "noise", (1e-3, 1e-3)),
])
def test_default_eps(path_type, prediction, eps):
    transport = create_transport(path_type, prediction)
    assert (transport.train_eps, transport.sample_eps) == pytest.approx(eps)


# (path, prediction, check_interval keywords, expected [t0, t1]); SDEs with the default last step of 0.04.
SDE = dict(sde=True, sampling=True, last_step_size=0.04)
INTERVALS = [
    ("VP", "velocity", {}, (0, 1 - 1e-5)),
    ("VP", "velocity", dict(sampling=True), (0, 1 - 1e-3)),
    ("VP", "noise", dict(sampling=True, reverse=True), (1 - 1e-3, 0)),  # official: (1, 1e-3), from sigma_t = 0
    ("VP", "velocity", SDE, (0, 0.96)),
    ("VP", "velocity", dict(sde=True, sampling=True), (0, 1 - 1e-3)),  # no last step
    ("Linear", "velocity", {}, (0, 1)),
    ("GVP", "velocity", dict(sampling=True), (0, 1)),
    ("Linear", "velocity", dict(sampling=True, reverse=True), (1, 0)),
    ("Linear", "velocity", SDE, (0, 0.96)),  # SBDM at eps = 0: rejected by sample_sde, see below
    ("GVP", "velocity", SDE | dict(diffusion_form="sigma"), (0, 0.96)),
    ("Linear", "noise", {}, (1e-3, 1 - 1e-3)),
    ("GVP", "score", dict(sampling=True), (1e-3, 1 - 1e-3)),
    ("Linear", "score", dict(sampling=True, reverse=True), (1 - 1e-3, 1e-3)),
    ("Linear", "noise", SDE, (1e-3, 0.96)),
    ("GVP", "noise", SDE | dict(diffusion_form="sigma"), (1e-3, 0.96)),
    ("Linear", "score", dict(sde=True, sampling=True), (1e-3, 1 - 1e-3)),
]


@pytest.mark.parametrize("path_type, prediction, kwargs, interval", INTERVALS)
def test_check_interval(path_type, prediction, kwargs, interval):
    assert create_transport(path_type, prediction).check_interval(**kwargs) == pytest.approx(interval)


def test_given_eps_are_used():
    transport = create_transport("Linear", "velocity", sample_eps=1e-3)
    assert transport.check_interval(**SDE) == pytest.approx((1e-3, 0.96))
    assert transport.check_interval(**SDE, diffusion_form="sigma") == pytest.approx((0, 0.96))
    assert transport.check_interval(sampling=True) == (0, 1)  # the velocity ODE still runs over [0, 1]
    assert create_transport("VP", train_eps=1e-4).check_interval() == pytest.approx((0, 1 - 1e-4))


def test_bad_names_are_explained():
    for kwargs, message in [(dict(path_type="Cosine"), "path type"), (dict(prediction="x0"), "prediction"),
                            (dict(loss_weight="snr"), "loss weight")]:
        with pytest.raises(ValueError, match=message):
            create_transport(**kwargs)
    sampler = Sampler(create_transport())
    with pytest.raises(ValueError, match="ODE method"):
        sampler.sample_ode(sampling_method="rk45")
    with pytest.raises(ValueError, match="SDE method"):
        sampler.sample_sde(sampling_method="Milstein", diffusion_form="sigma")
    with pytest.raises(ValueError, match="diffusion form"):
        sampler.sample_sde(diffusion_form="cosine")


#################################################################################
#                                   Samplers                                    #
#################################################################################

@pytest.mark.parametrize("method, nfe", [("euler", 7), ("heun2", 14)])
def test_fixed_grid_ode_reproduces_reference(ref, method, nfe):
    e, model = ref["e"], ref["model"]
    steps = ref["config"]["ode_steps"]
    sample_fn = Sampler(create_transport("Linear", "velocity")).sample_ode(sampling_method=method, num_steps=steps)
    with torch.no_grad():
        xs = sample_fn(e["x0"], model, y=e["y"])
    assert xs.shape == (steps, *e["x0"].shape)
    torch.testing.assert_close(xs[0], e["x0"], atol=0, rtol=0)
    assert_fp32_close(xs[-1], e[f"ode_{method}_{steps}"], rel=LOOP_REL)
    assert sample_fn.nfe.tolist() == [nfe] * 4


def test_dopri5_is_batch_invariant_and_counts_evaluations(ref):
    e, model = ref["e"], ref["model"]
    sample_fn = Sampler(create_transport()).sample_ode()  # dopri5, atol 1e-6, rtol 1e-3, 50 points
    assert (sample_fn.method, sample_fn.atol, sample_fn.rtol, sample_fn.num_steps) == ("dopri5", 1e-6, 1e-3, 50)
    calls = []

    def counted(x, t, **kwargs):
        calls.append(len(x))
        return model(x, t, **kwargs)

    with torch.no_grad():
        batch = sample_fn(e["x0"][:3], counted, y=e["y"][:3])
        batch_nfe = sample_fn.nfe.clone()
        alone = sample_fn(e["x0"][1:2], counted, y=e["y"][1:2])
    assert batch.shape == (50, 3, 4, 8, 8)
    assert_fp32_close(alone[:, 0], batch[:, 1])
    assert sample_fn.nfe.tolist() == [batch_nfe[1].item()]
    assert batch_nfe.shape == (3,) and (batch_nfe > 6).all()  # dopri5: at least one step of 6 stages
    assert len(calls) == batch_nfe.sum() + sample_fn.nfe.sum() and set(calls) == {1}


@pytest.mark.parametrize("method", ["Euler", "Heun"])
@pytest.mark.parametrize("path_type, diffusion_form", [("Linear", "sigma"), ("VP", "SBDM")])
def test_sde_image_depends_only_on_its_generator(ref, method, path_type, diffusion_form):
    e, model = ref["e"], ref["model"]
    sample_fn = Sampler(create_transport(path_type)).sample_sde(sampling_method=method, diffusion_form=diffusion_form,
                                                                num_steps=6)

    def run(rows, seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        with torch.no_grad():
            return sample_fn(e["x0"][rows], model, generator=gens, y=e["y"][rows])

    batch = run([0, 1, 2], [10, 11, 12])
    assert len(batch) == 6 and batch[-1].shape == (3, 4, 8, 8)  # 5 steps and the last one
    alone, other_batch = run([1], [11]), run([3, 1], [13, 11])
    for i in range(6):
        # Equal up to the rounding of batched model calls.
        assert_fp32_close(alone[i][0], batch[i][1])
        assert_fp32_close(other_batch[i][1], batch[i][1])
    assert not torch.allclose(run([1], [99])[-1], alone[-1])  # the noise does come from the generator
    with pytest.raises(ValueError, match="one per row"):
        run([0, 1], [1])


@pytest.mark.parametrize("last_step", ["Mean", "Tweedie", "Euler", None])
def test_sde_last_steps(ref, last_step):
    e, model = ref["e"], ref["model"]
    sample_fn = Sampler(create_transport("VP")).sample_sde(last_step=last_step, num_steps=5)
    with torch.no_grad():
        xs = sample_fn(e["x0"], model, generator=torch.Generator().manual_seed(0), y=e["y"])
    assert len(xs) == 5 and all(x.shape == e["x0"].shape and torch.isfinite(x).all() for x in xs)
    assert (xs[-1] is xs[-2]) == (last_step is None)


def test_sde_with_one_generator_is_reproducible(ref):
    e, model = ref["e"], ref["model"]
    sample_fn = Sampler(create_transport("GVP")).sample_sde(diffusion_form="sigma", num_steps=4)
    with torch.no_grad():
        a, b = (sample_fn(e["x0"], model, generator=torch.Generator().manual_seed(3), y=e["y"])[-1] for _ in "ab")
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_sbdm_sde_from_the_singular_end_is_refused():
    with pytest.raises(ValueError, match="infinite at t = 0"):
        Sampler(create_transport("Linear", "velocity")).sample_sde()  # official: NaN samples
    Sampler(create_transport("Linear", "velocity", sample_eps=1e-3)).sample_sde()
    Sampler(create_transport("VP", "velocity")).sample_sde()  # VP's SBDM diffusion is beta / 2, finite


@pytest.mark.parametrize("path_type", list(PATHS))
@pytest.mark.parametrize("prediction", ["velocity", "score", "noise"])
def test_samplers_with_the_exact_model_of_gaussian_data(path_type, prediction):
    """Data N(mean, std^2): the probability-flow ODE is the affine map x_t = alpha_t mean + sqrt(V_t / V_t0)
    (x_t0 - alpha_t0 mean), and the SDE ends in N(mean, std^2), whatever the model predicts."""
    torch.manual_seed(0)
    mean, std, noise = torch.tensor([[1.0, -2.0, 0.5]]), 0.5, torch.randn(4000, 3)
    transport = create_transport(path_type, prediction)
    path, model, sampler = transport.path_sampler, gaussian_oracle(transport.path_sampler, mean, std, prediction), \
        Sampler(transport)
    ode = sampler.sample_ode(sampling_method="dopri5", num_steps=2, atol=1e-7, rtol=1e-5)
    t0, t1 = transport.check_interval(sampling=True)
    alpha0, alpha1 = (path.compute_alpha_t(torch.tensor(t))[0] for t in (t0, t1))
    var0, var1 = (path.compute_alpha_t(torch.tensor(t))[0] ** 2 * std ** 2 + path.compute_sigma_t(torch.tensor(t))[0]
                  ** 2 for t in (t0, t1))
    exact = alpha1 * mean + (var1 / var0).sqrt() * (noise[:8] - alpha0 * mean)
    torch.testing.assert_close(ode(noise[:8], model)[-1], exact, atol=2e-4, rtol=0)
    sde = sampler.sample_sde(diffusion_form="sigma", num_steps=100)(noise, model,
                                                                    generator=torch.Generator().manual_seed(0))[-1]
    torch.testing.assert_close(sde.mean(0, keepdim=True), mean, atol=0.05, rtol=0)
    torch.testing.assert_close(sde.std(0), torch.full((3,), std), atol=0.05, rtol=0)


@pytest.mark.parametrize("path_type, prediction", [("Linear", "velocity"), ("VP", "noise"), ("GVP", "score")])
def test_reverse_ode_returns_to_the_noise(path_type, prediction):
    torch.manual_seed(0)
    mean, std, noise = torch.tensor([[1.0, -2.0, 0.5]]), 0.5, torch.randn(4, 3)
    transport = create_transport(path_type, prediction)
    model, sampler = gaussian_oracle(transport.path_sampler, mean, std, prediction), Sampler(transport)
    data = sampler.sample_ode(num_steps=3, atol=1e-7, rtol=1e-5)(noise, model)[-1]
    back = sampler.sample_ode(num_steps=3, atol=1e-7, rtol=1e-5, reverse=True)(data, model)
    torch.testing.assert_close(back[-1], noise, atol=5e-4, rtol=0)
