"""Presets of reproduce.py: every stage's flags for one study, in one place.

A preset names, per section, the flags given to the stage scripts (without the leading --):
    standard   train_standard.py (Standard AT, TRADES, MART)
    surrogate  train_standard.py for the transfer attack's surrogate: the standard section's flags, then these
    estimators train_MI_estimator.py (the NAMID estimators)
    only-max   train_MI_estimator_only_max.py (the WMIM estimators)
    namid      train_MIAT.py (NAMID, NAMID-T, NAMID-M, WMIM)
    eval       the evaluation script's (test_comparison.py unless eval_script says otherwise: the comparison
               table and the robust-accuracy-against-epsilon curve)
    common     every stage script that has the flag
and the runner's own settings (seeds, defenses, the curve's epsilons, parallel jobs, and namid_estimators: the
stage-2 run NAMID, NAMID-T and NAMID-M read, "estimators" or "only-max"). A flag a preset
leaves out takes the stage script's default, which follows the dataset (utils/cli.py). reproduce.py
--set SECTION.FLAG=VALUE (or FLAG=VALUE for every stage that has it) overrides any of them.
Optional keys:
    eval_variants  {variant: {eval flag: value}}: every defense is evaluated once per variant (folder
                   eval-<defense>-<variant>), with the eval section's flags and then the variant's; the table
                   gets one column per (variant, attack), "<variant>: <attack>". Without it: one evaluation.
    reference      the published table results.md shows for orientation (utils/study.py REFERENCE_TABLES;
                   default: NAMID's Table 1)
    eval_script    the evaluation script of stage 4 (utils/evaluators.py EVALUATORS; default test_comparison.py):
                   the eval section then holds its flags, --set eval.FLAG and the plan are checked against its
                   parser, and the study's table reads its results.json (test_mixup_inference.py adds a row per
                   mixup inference mode under each defense). The curve (epsilons) needs test_comparison.py.
    eval_per_defense  {defense: {eval flag: value}}: flags for that defense's evaluations only, after the eval
                   section's and the variant's (e.g. mixup inference's lambda 0.6 for IAT)
"""

# The NAMID paper's defenses (the rows of its Table 1), the default rows of the paper-like presets.
NAMID_DEFENSES = ("standard-at", "namid", "trades", "namid-t", "mart", "namid-m", "wmim")
# The defenses of Tianyu Pang's talk (MM-LDA, MMC, ADP), alone, with adversarial training and with NAMID.
TALK_DEFENSES = ("sce", "mm-lda", "mmc", "at-mm-lda", "at-mmc", "ensemble", "adp-2-0", "adp", "at-adp",
                 "namid-mmc", "namid-adp")
# Mixup training and interpolated adversarial training, the models mixup inference is meant for (the talk's
# ICLR 2020 paper; test_mixup_inference.py).
MIXUP_DEFENSES = ("mixup", "iat")
# Reverse cross-entropy training, naturally and with adversarial training (the talk's NeurIPS 2018 paper), the
# models its detectors (confidence, non-ME, K-density; test_detection.py) are meant for.
RCE_DEFENSES = ("rce", "at-rce")
ALL_DEFENSES = NAMID_DEFENSES + TALK_DEFENSES + MIXUP_DEFENSES + RCE_DEFENSES
ALL_ATTACKS = "pgd aa fwa tidim pgd-l2 cw ddn transfer"

# alpha on MNIST-like data: at the paper's alpha 5 NAMID does not train a SmallCNN on Fashion-MNIST at
# batch 64-128: it collapses to a constant prediction with uninformative estimators
# (bench/results/fmnist_stage3_namid_runs.md) and with informative ones, with or without the alpha warm-up
# and --min-selected (bench/results/fmnist_stage3_namid_search/); alpha 0.5 trains. NAMID-T at alpha 0.5
# once reached a NaN loss in its first adversarial epoch (seed 0, 5000 images, batch 64), and with the
# gradient's global norm clipped at 10 it trained (bench/results/fmnist_study_subset/); the clipping is given
# to every target training of these presets, baselines included, so that it does not decide the comparison.
MNIST_LIKE_TRAINING = {"grad-clip": 10}
MNIST_LIKE_NAMID = {"alpha": 0.5, **MNIST_LIKE_TRAINING}
# Stage 2 on MNIST-like data (bench/results/fmnist_stage2_recipes/): only-max (Eq. 4) estimators trained with
# Adam at a constant lr 1e-3 are informative (on 10 000 Fashion-MNIST images after 10 epochs, E_n 1.56 and
# E_a 0.98 nats on the test samples each is meant for); the published code's lr 1e-2 cut twice stalls them
# (0.84 / 0.47), and the published objective, the literal Eq. 5 and the bounded Eq. 5 train estimators
# that are not informative (the last two see only X', a tenth of the samples). So NAMID reads the only-max
# estimators in these presets (namid_estimators); train_MI_estimator.py keeps the bounded Eq. 5 for
# --namid-estimators estimators.
MNIST_LIKE_ESTIMATOR_RECIPE = {"lr": 0.001, "milestones": [], "epochs": 10}
MNIST_LIKE_STAGE2 = {"estimators": {"estimator-loss": "paper-bounded", **MNIST_LIKE_ESTIMATOR_RECIPE},
                     "only-max": MNIST_LIKE_ESTIMATOR_RECIPE, "namid_estimators": "only-max"}

# test_comparison.py's flags for the seed talk's attacks, named here only, so that a renamed flag is fixed in
# one place: BIM and MIM (steps, step size), multi-targeted margin PGD (target classes, steps per target) and
# the long cross-entropy PGD with random restarts (restarts, steps per restart).
BIM_STEPS, BIM_STEP_SIZE = "bim-steps", "bim-step-size"
MIM_STEPS, MIM_STEP_SIZE = "mim-steps", "mim-step-size"
MT_TARGETS, MT_STEPS = "mt-targets", "mt-steps"
RESTARTS, RESTARTS_STEPS = "restarts", "restarts-steps"
# Multi-targeted margin PGD against every other class (9 of 10), as many steps per target as the table's PGD-40:
# the attack that breaks MMC when cross-entropy on its saturated logits does not (defenses/max_mahalanobis.py).
MULTI_TARGETED = {MT_TARGETS: 9, MT_STEPS: 40}
# The long cross-entropy PGD: 5 random restarts of 100 steps, a check that PGD-10/40 had converged (the MMC
# numbers fall from PGD-10 to PGD-50 in the authors' table) at a quarter of AutoAttack's gradient steps.
LONG_PGD = {RESTARTS: 5, RESTARTS_STEPS: 100}
# The ADP paper's MNIST attacks under its own protocol (-p: cross-entropy on the averaged probabilities treated
# as logits, as the authors' cleverhans attacks computed it) and under ours (on log p_bar), then the long PGD
# and AutoAttack.
ADP_PROTOCOL_ATTACKS = "fgsm-p bim-p pgd-p mim-p fgsm bim pgd mim pgd-restarts aa"


def ten_step_attacks(epsilon: str) -> dict:
    """The ADP authors' white-box settings at one budget: BIM, PGD and MIM with 10 steps of epsilon / 10
    (test_cifar_iterative.py); epsilon as written ("0.1"), the step as its tenth, written exactly."""
    from fractions import Fraction
    step = str(float(Fraction(epsilon) / 10))
    return {"epsilon": epsilon, "pgd-steps": 10, "pgd-step-size": step, BIM_STEPS: 10, BIM_STEP_SIZE: step,
            MIM_STEPS: 10, MIM_STEP_SIZE: step}


# test_mixup_inference.py on the CPU (mixup-fashion-mnist-cpu), sized on one loaded core (OMP_NUM_THREADS=1, load
# ~3.5 on 2 cores): on 50 test images, 1 repeat, an IAT SmallCNN (36 % clean), modes OL (30 partners) and PL
# (10): AutoAttack 'rand' 10 it. x EOT 1 took 24 s (OL) and 7 s (PL), clean and oblivious ~2 s each, the base
# model's row ~5 s. AutoAttack attacks only the points still correct, so for a model at ~85 % clean accuracy its
# time is scaled by ~2.8: ~87 s per 50 images and repeat. EOT-PGD attacks every image: its 50 steps (Tramer et
# al.'s break of mixup inference: PGD-50 through the whole MI-OL forward, a fresh partner draw per forward; step
# epsilon / 10 at the presets' epsilon 0.1, theirs epsilon / 16) took 96 s (OL) and 26 s (PL) on 20 images of a
# Standard AT SmallCNN (load ~4), ~305 s per 50 images. Hence 100 test images x 3 repeats ~ 2 x 3 x (87 + 305 +
# 4) s ~ 40 min per evaluation (with EOT-PGD-10 and 5 repeats it was ~23 min, but 10 steps are not the attack that
# broke the defense). The authors' oblivious PGD-10 is crafted once on the base model; EOT-PGD and AutoAttack get
# 1 partner draw per step, each forward of the wrapper itself averaging 30 (OL) or 10 (PL) partners; the
# worst-case column covers the attacks' weaknesses as far as any of them succeeds.
MIXUP_TEST_LIMIT = 100
MIXUP_CPU_ATTACKS = {"pgd-steps": 10, "eot-steps": 50, "eot-step-size": 0.01, "eot-samples": 1, "aa-iterations": 10,
                     "aa-eot-iter": 1}

# test_detection.py on the CPU (rce-fashion-mnist-cpu, rce-mnist-cpu), at its defaults (BIM and ILCM 10 steps, JSMA
# theta 1 gamma 0.1, C&W 5 binary steps x 100 iterations and C&W-hc 5 x 200 at confidence 10, both at Adam lr 0.1,
# the detector-aware PGD 50 steps towards each of the 9 wrong classes), on the authors' 1000 test images. C&W's
# settings are written out in the preset (DETECTION_CW) so that a record of the earlier defaults (lr 0.01, 50 / 100
# iterations) is never taken for one of these: those fooled only 37-39 % of a 10-epoch CE SmallCNN's correctly
# classified images on Fashion-MNIST (these 100 %), and C&W-hc none of the RCE model's (these 43 %, at a median L2
# of 8: RCE's reversed logits rarely reach a margin of 10, their clean top-1 margin has median 2.7). Timed in the
# first seed-0 run (load ~4 on 2 cores): an evaluation took ~27 min at the old C&W settings, and the new ones add
# ~20 (CE) and ~30 (RCE) minutes on 1000 images (from 100-image probes), ~47-57 min per evaluation; with 2 jobs a
# 3-seed study's 6 evaluations take ~3 h after the trainings.
DETECTION_TEST_LIMIT = 1000
DETECTION_CW = {"cw-steps": 100, "cw-hc-steps": 200, "cw-lr": 0.1}
# MNIST needs more C&W iterations: advertorch's C&W optimises in tanh space from arctanh(0.999999 (2x - 1)), and
# most MNIST pixels are exactly 0 or 1, where Adam at lr 0.1 needs ~70 iterations to move one at all. On the seed-0
# RCE SmallCNN of rce-mnist-cpu (100 test images; bench/results/rce-mnist-cpu/cw_check) C&W reached its target on
# 65 % at 5 x 100 (c0 1 or 10, 5 or 9 binary steps alike; lr 0.5: 71 %), 88 % at 5 x 300, 100 % at 5 x 1 000,
# 98 % at 4 x 500 from c0 10 (84 % at 5 x 300 from c0 10: the constant must reach ~100 before the iterations
# help). 4 x 500 from c0 10 costs 2 000 iterations per image, 40 % of 5 x 1 000; C&W-hc gets the same.
MNIST_DETECTION_CW = {"cw-steps": 500, "cw-hc-steps": 500, "cw-search-steps": 4, "cw-initial-const": 10,
                      "cw-lr": 0.1}
# The detector-aware attack towards every wrong class, written out for the same reason: its earlier default of the 3
# with the highest clean logits left an RCE SmallCNN (Fashion-MNIST, seed 0, 200 test images) 28.0 % accuracy with
# rejection by all three detectors, all 9 targets 20.0 % (200 steps of eps/10: 28.0 % towards the 3, 19.5 % towards
# all 9); ~3x its time.
DETECTION_AWARE = {"aware-targets": 9}
# every attack of test_detection.py (its default; written out over _paper_like's test_comparison.py attacks)
DETECTION_ATTACKS = "fgsm bim ilcm jsma cw cw-hc aware aa"


def _paper_like(dataset, epsilons, description, **sections):
    preset = {
        "description": description,
        "seeds": [0, 1, 2],
        "defenses": list(NAMID_DEFENSES),
        "epsilons": epsilons,
        "jobs": 1,
        "common": {"dataset": dataset},
        "standard": {},
        "estimators": {"estimator-loss": "paper-bounded"},
        "only-max": {},
        "namid_estimators": "estimators",
        "namid": {"alpha": 5, "lambda": 0.1},
        "eval": {"attacks": ALL_ATTACKS},
        "surrogate": {"arch": "vgg19"},  # paper Table 2: a separately trained VGG-19 with Standard AT
        "reference": "namid-table1",
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            preset[key] = {**preset.get(key, {}), **value}
        else:
            preset[key] = value
    return preset


COLOUR_EPSILONS = ["2/255", "4/255", "8/255", "12/255", "16/255"]

PRESETS = {
    "cifar10-paper": _paper_like(
        "cifar10", COLOUR_EPSILONS,
        "CIFAR-10 with the paper's settings (docs/method.md section 2): ResNet-18, 100 epochs, batch 1024, lr 0.1, "
        "PGD-10 step eps/4, eps 8/255, Eq. 5 estimators, alpha 5, lambda 0.1; every Table 1 attack and the "
        "VGG-19 transfer column. GPU only."),
    "cifar10-reference": _paper_like(
        "cifar10", COLOUR_EPSILONS,
        "CIFAR-10 with the published code's settings: WRN-34-10, batch 256, PGD-40, the published estimator "
        "objective, lambda 0, 2 clean warm-up epochs. Its defects stay fixed (docs/method.md section 8): the "
        "baselines train with PGD-40 like NAMID (the code gave them PGD-10: --set standard.num-steps=10), the "
        "estimators use the target's threat model, and AutoAttack runs in full. BatchNorm statistics are updated "
        "by clean and adversarial batches as in the published NAMID code, and so in the baselines too "
        "(--bn-stats mixed).",
        common={"arch": "wrn-34-10", "batch-size": 256, "num-steps": 40, "bn-stats": "mixed"},
        standard={"warmup-epochs": 2},
        estimators={"estimator-loss": "reference"},
        namid={"preset": "reference", "alpha": 5, "lambda": 0}),
    "tiny-imagenet-paper": _paper_like(
        "tiny-imagenet", COLOUR_EPSILONS,
        "Tiny-ImageNet with the paper's settings: ResNet-18, 100 epochs, batch 1024, PGD-10, eps 8/255, "
        "alpha 5, lambda 0.1. GPU only."),
    "mnist": _paper_like(
        "mnist", ["0.1", "0.2", "0.3", "0.4"],
        "MNIST, SmallCNN, eps 0.3, 20 epochs (the MNIST-like defaults of utils/cli.py); NAMID reads only-max "
        "estimators (Adam lr 1e-3, 10 epochs), alpha 0.5, gradient norm clipped at 10 (see utils/presets.py).",
        standard=MNIST_LIKE_TRAINING, namid=MNIST_LIKE_NAMID, **MNIST_LIKE_STAGE2),
    "fashion-mnist": _paper_like(
        "fashion-mnist", ["0.025", "0.05", "0.1", "0.15", "0.2"],
        "Fashion-MNIST, SmallCNN, eps 0.1, 20 epochs (the MNIST-like defaults of utils/cli.py); NAMID reads "
        "only-max estimators (Adam lr 1e-3, 10 epochs), alpha 0.5, gradient norm clipped at 10 (see utils/presets.py).",
        standard=MNIST_LIKE_TRAINING, namid=MNIST_LIKE_NAMID, **MNIST_LIKE_STAGE2),
    "fashion-mnist-cpu": _paper_like(
        "fashion-mnist", [],
        "The comparison that fits a 2-core CPU: Standard AT against NAMID and TRADES against NAMID-T on 10 000 "
        "Fashion-MNIST training images, 10 epochs, seeds 0-2, AutoAttack and PGD-40 on 1 000 test images; the "
        "fashion-mnist preset's settings otherwise (no curve, no transfer).",
        defenses=["standard-at", "namid", "trades", "namid-t"], jobs=2, surrogate=None,
        common={"dataset": "fashion-mnist", "train-limit": 10000, "test-limit": 1000},
        standard={"epochs": 10, **MNIST_LIKE_TRAINING}, namid={**MNIST_LIKE_NAMID, "epochs": 10},
        eval={"attacks": "pgd aa", "pgd-steps": 40}, **MNIST_LIKE_STAGE2),
    "demo": _paper_like(
        "fashion-mnist", ["0.05", "0.1", "0.15", "0.2"],
        "About 10 minutes on 2 CPU cores: every defense, one seed, on 2000 Fashion-MNIST training images "
        "(4 epochs) and 500 test images, under PGD-20 (L-inf and L2). Shows the whole pipeline working; its "
        "numbers are far from converged.",
        seeds=[0], jobs=2, surrogate=None,
        common={"dataset": "fashion-mnist", "train-limit": 2000, "val-size": 500, "test-limit": 500, "batch-size": 64},
        standard={"epochs": 4, "eps-ramp-epochs": 1, "eval-steps": 10, **MNIST_LIKE_TRAINING},
        **{**MNIST_LIKE_STAGE2, "estimators": {**MNIST_LIKE_STAGE2["estimators"], "epochs": 5},
           "only-max": {**MNIST_LIKE_ESTIMATOR_RECIPE, "epochs": 5}},
        namid={**MNIST_LIKE_NAMID, "epochs": 4, "eps-ramp-epochs": 1, "eval-steps": 10},
        eval={"attacks": "pgd pgd-l2", "pgd-steps": 20, "pgd-l2-steps": 20}),
    "seed-talk-fashion-mnist-cpu": _paper_like(
        "fashion-mnist", [],
        "The seed talk's MMC comparison on a 2-core CPU: SCE, MM-LDA, MMC-10, Standard AT, AT-MMC-10, ADP_{2,0.5}, "
        "AT + ADP_{2,0.5} and NAMID on an MMC head (estimators trained on AT-MMC-10) on 5 000 Fashion-MNIST "
        "training images, 10 epochs, seeds 0-2; PGD-40, AutoAttack, multi-targeted PGD and PGD with restarts "
        "on 500 test images; the fashion-mnist-cpu preset's settings otherwise.",
        # Rows: the talk's MMC table (SCE, MM-LDA, MMC-10, AT-SCE = Standard AT, AT-MMC-10), ADP alone and with AT,
        # and NAMID on the head that claims robustness without AT. at-mmc is also the target of namid-mmc's stage 2.
        defenses=["sce", "mm-lda", "mmc", "standard-at", "at-mmc", "adp", "at-adp", "namid-mmc"],
        jobs=2, surrogate=None,  # 2 stages at once on 2 cores, as fashion-mnist-cpu; no transfer column
        reference="mmc-iclr2020",
        # half of fashion-mnist-cpu's training images and test images: 8 rows instead of 4, and 3-member ensembles
        common={"dataset": "fashion-mnist", "train-limit": 5000, "test-limit": 500},
        # each head with its authors' optimiser (utils/cli.py HEAD_DEFAULTS: SGD lr 0.01 for MM-LDA and MMC, Adam lr 1e-3
        # for ADP; SGD lr 0.05 for the softmax rows, the MNIST-like default), at a common budget: the MNIST-like
        # schedule, warm-up and ramp, 10 epochs as fashion-mnist-cpu, gradient norm clipped at 10 in every row
        standard={"epochs": 10, **MNIST_LIKE_TRAINING},
        # NAMID as fashion-mnist-cpu (clipping at 10, 10 epochs, only-max estimators: MNIST_LIKE_STAGE2) but alpha 13.6:
        # the MMC loss (~22 on an AT-MMC-10 SmallCNN) has ~27x the gradient of cross-entropy relative to L_mi (median
        # |grad L_mi| / |grad L_base| 0.156 against 4.26 on the softmax Standard AT target, seed 0), so alpha 0.5 x 27.2
        # gives NAMID (MMC-10) the MI pull NAMID has at alpha 0.5 (bench/results/namid_gradient_ratio/)
        namid={**MNIST_LIKE_NAMID, "epochs": 10, "alpha": 13.6},
        # PGD-40 and AutoAttack as fashion-mnist-cpu, plus the two attacks that do not rely on softmax-CE being
        # informative on MMC's logits (multi-targeted margin PGD) and on PGD-40 having converged (restarts)
        eval={"attacks": "pgd aa pgd-mt pgd-restarts", "pgd-steps": 40, **MULTI_TARGETED, **LONG_PGD},
        **MNIST_LIKE_STAGE2),
    "adp-mnist-cpu": _paper_like(
        "mnist", [],
        "The ADP paper's MNIST Table 2 (the seed talk) at CPU scale: the plain ensemble, ADP_{2,0} and ADP_{2,0.5} "
        "(3 SmallCNN members) on 10 000 MNIST training images, the authors' Adam lr 1e-3 and batch 64, 10 epochs, "
        "seeds 0-2; FGSM, BIM, PGD and MIM (10 steps of eps/10) under the authors' protocol (-p: CE on the averaged "
        "probabilities) and ours, PGD with restarts and AutoAttack at eps 0.1 and 0.15, on 250 test images.",
        # the three columns of the ADP paper's Table 2; no NAMID row, so no stage 2 or 3
        defenses=["ensemble", "adp-2-0", "adp"],
        # 3 seeds: 9 natural trainings of 3-member SmallCNN ensembles (657-932 s each for seed 0) and 18 evaluations
        # (the plain ensemble's, seed 0: 2 500 s at eps 0.1, 1 866 s at 0.15); 2 stages at once on 2 cores; no
        # transfer column, no curve
        jobs=2, surrogate=None,
        reference="adp-icml2019-mnist",
        common={"dataset": "mnist", "train-limit": 10000, "test-limit": 1000},
        # The authors' MNIST recipe (train_mnist.py): Adam lr 1e-3, batch 64, x0.1 after 15 and x0.01 after 30 of
        # 40 epochs, i.e. at 3/8 and 3/4 of the epochs: milestones 4 and 8 of 10 (3.75 and 7.5 rounded); L2 1e-4
        # (theirs on the conv kernels, here on every weight); no gradient clipping (theirs had none, and Adam's
        # step does not scale with the gradient). The ensemble size (--members) is the default 3, theirs.
        # Natural training selects best.pt on clean accuracy, so the per-epoch PGD on the validation and test images
        # only monitors: 5 steps instead of 20 (with 20, it took 4x the epoch's training on a 3-member ensemble).
        standard={"epochs": 10, "optimizer": "adam", "lr": 0.001, "milestones": [4, 8], "batch-size": 64,
                  "weight-decay": 0.0001, "eval-steps": 5},
        # 250 test images per seed and budget: natural MNIST ensembles keep ~88 % under APGD-T at eps 0.1, so AutoAttack
        # runs all four of its attacks on nearly every image (plain ensemble, seed 0, one loaded core, the first 250
        # images: APGD-CE 87 s, APGD-T 703 s, then FAB-T still running after 400 s); at 1 000 images each of the 18
        # evaluations would take hours
        eval={"test-limit": 250, "attacks": ADP_PROTOCOL_ATTACKS, **LONG_PGD},
        # the two budgets of the ADP paper's MNIST table for BIM, PGD and MIM (its FGSM rows are 0.1 and 0.2),
        # each with the authors' 10 steps of eps / 10
        eval_variants={"eps0.1": ten_step_attacks("0.1"), "eps0.15": ten_step_attacks("0.15")}),
    "mixup-fashion-mnist-cpu": _paper_like(
        "fashion-mnist", [],
        "Mixup inference (the talk's ICLR 2020 paper) on a 2-core CPU: Standard AT, Mixup and IAT (SmallCNN, 10 000 "
        "Fashion-MNIST training images, 10 epochs, seeds 0-2), each evaluated by test_mixup_inference.py as itself "
        "and wrapped in mixup inference OL and PL (lambda 0.5; OL 0.6 on IAT, the authors'), under the oblivious "
        "PGD-10, EOT-PGD-50 and AutoAttack 'rand' (10 iterations) and their worst case, 3 repeats, on 100 test images.",
        # Standard AT is the baseline the authors compare with; NAMID (--defenses namid) would add the stage-2 and -3
        # runs of fashion-mnist-cpu (MNIST_LIKE_STAGE2, alpha 0.5), not a row by default
        defenses=["standard-at", "mixup", "iat"], jobs=2, surrogate=None,
        reference="mixup-inference-iclr2020",
        # training as fashion-mnist-cpu (its Standard AT runs have these very flags, 1 000 test images monitored
        # per epoch); the evaluations on MIXUP_TEST_LIMIT test images
        common={"dataset": "fashion-mnist", "train-limit": 10000, "test-limit": 1000},
        standard={"epochs": 10, **MNIST_LIKE_TRAINING}, namid={**MNIST_LIKE_NAMID, "epochs": 10},
        eval_script="test_mixup_inference.py",
        eval={"test-limit": MIXUP_TEST_LIMIT, "attacks": "oblivious eot-pgd aa-rand", "modes": "ol pl", "repeats": 3,
              **MIXUP_CPU_ATTACKS},
        # the authors' lambda for MI-OL on IAT-trained models; --mixup-lambda also sets PL's, so IAT's PL row mixes
        # at 0.6 too (the authors report PL with mixup-trained models only)
        eval_per_defense={"iat": {"mixup-lambda": 0.6}},
        **MNIST_LIKE_STAGE2),
    "rce-fashion-mnist-cpu": _paper_like(
        "fashion-mnist", [],
        "The RCE paper's detection study (the seed talk; NeurIPS 2018) on a 2-core CPU: CE (SCE) and RCE SmallCNNs "
        "(10 000 Fashion-MNIST training images, 10 epochs, seeds 0-2), each evaluated by test_detection.py on 1 000 "
        "test images: ROC AUC of confidence, non-ME and K-density under FGSM, BIM, ILCM, JSMA, C&W and C&W-hc (the "
        "authors' protocol) and accuracy with rejection at a 5 % clean FPR, also under a detector-aware PGD.",
        # CE is the natural softmax row "sce"; AT-RCE (--defenses at-rce) would add RCE with adversarial training
        defenses=["sce", "rce"], jobs=2, surrogate=None,  # 2 stages at once on 2 cores; no transfer column, no curve
        reference="rce-nips2018",
        # training as the other Fashion-MNIST CPU presets (1 000 test images monitored per epoch, gradient norm
        # clipped at 10); CE at the dataset's SGD lr 0.05, RCE at its authors' lr 0.1 (utils/cli.py HEAD_DEFAULTS)
        common={"dataset": "fashion-mnist", "train-limit": 10000, "test-limit": 1000},
        standard={"epochs": 10, **MNIST_LIKE_TRAINING},
        eval_script="test_detection.py",
        eval={"test-limit": DETECTION_TEST_LIMIT, "attacks": DETECTION_ATTACKS, **DETECTION_CW, **DETECTION_AWARE}),
    "rce-mnist-cpu": _paper_like(
        "mnist", [],
        "The RCE paper's MNIST AUC table (the seed talk; NeurIPS 2018) at CPU scale: CE (SCE) and RCE SmallCNNs "
        "(20 000 MNIST training images, 10 epochs, seeds 0-2, eps 0.3), evaluated by test_detection.py on 1 000 "
        "test images as rce-fashion-mnist-cpu, C&W with 4 x 500 iterations from c0 10 (MNIST's saturated pixels).",
        defenses=["sce", "rce"], jobs=2, surrogate=None,
        reference="rce-nips2018-mnist",
        # twice rce-fashion-mnist-cpu's training images: natural training of a SmallCNN is cheap next to the
        # evaluations, whose time does not depend on it (K-density keeps its 1 000 kernels per class either way)
        common={"dataset": "mnist", "train-limit": 20000, "test-limit": 1000},
        standard={"epochs": 10, **MNIST_LIKE_TRAINING},
        eval_script="test_detection.py",
        eval={"test-limit": DETECTION_TEST_LIMIT, "attacks": DETECTION_ATTACKS, **MNIST_DETECTION_CW,
              **DETECTION_AWARE}),
}
