#!/usr/bin/env python3
"""Mutation check: apply each miswiring the test suite must catch, run the tests aimed at it, revert.

    python3 tests/mutation_check.py            # every mutation (about 10 minutes on 2 cores)
    python3 tests/mutation_check.py pgd-start  # one of them

Each mutation is a literal replacement in one file; the tests named with it must fail once it is applied.
The file is always restored, also when the run is interrupted. Exits non-zero if a mutation survives.
"""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# name: (file, original text, mutated text, pytest node ids or -k selections that must fail)
MUTATIONS = {
    "adversarial-estimator-reads-x~": (
        "utils/mi.py", 'local_encoding(estimators["adversarial"], x_adv.float() - x.float())',
        'local_encoding(estimators["adversarial"], x_adv.float())',
        ["tests/test_mi.py", "tests/test_namid.py::test_step_feeds_the_image_to_the_natural_estimator_and_the_pattern_to_the_adversarial_one"]),
    "I_N(x;h(x~))-reads-h(x)": (
        "utils/mi.py", '"nat_mi_adv": ("natural", "nat", "adv")', '"nat_mi_adv": ("natural", "nat", "nat")',
        ["tests/test_mi.py"]),
    "pgd-start-removed": (
        "utils/attacks.py", "delta = project(random_start(x, config, generator), config.norm, config.epsilon)",
        "delta = torch.zeros_like(x)",
        ["tests/test_attacks.py"]),
    "autoattack-version-plus": (
        "utils/evaluation.py", 'kwargs = dict(norm="Linf", eps=epsilon, version=version, seed=seed, device=x.device)',
        'kwargs = dict(norm="Linf", eps=epsilon, version="plus", seed=seed, device=x.device)',
        ["tests/test_evaluation.py::test_autoattack_runs_the_standard_version_exactly"]),
    "autoattack-fewer-iterations": (
        "utils/evaluation.py", "            adversary = cls(Float32Logits(model).eval(), **kwargs)\n",
        "            adversary = cls(Float32Logits(model).eval(), **kwargs)\n            adversary.apgd.n_iter = 10\n",
        ["tests/test_evaluation.py::test_autoattack_runs_the_standard_version_exactly"]),
    "autoattack-fewer-square-queries": (
        "utils/evaluation.py", "            adversary = cls(Float32Logits(model).eval(), **kwargs)\n",
        "            adversary = cls(Float32Logits(model).eval(), **kwargs)\n            adversary.square.n_queries = 1000\n",
        ["tests/test_evaluation.py::test_autoattack_runs_the_standard_version_exactly"]),
    "autoattack-attack-list": (
        "utils/evaluation.py", "            adversary = cls(Float32Logits(model).eval(), **kwargs)\n",
        "            adversary = cls(Float32Logits(model).eval(), **kwargs)\n            adversary.attacks_to_run = ['apgd-ce', 'apgd-t']\n",
        ["tests/test_evaluation.py::test_autoattack_runs_the_standard_version_exactly"]),
    "wmim-on-clean-x": (
        "utils/namid.py", 'local_adv_image = local_encoding(estimators["natural"], x_adv)',
        'local_adv_image = local_encoding(estimators["natural"], x)',
        ["tests/test_namid.py::test_wmim_maximises_the_mi_of_the_adversarial_image_with_its_logits"]),
    "estimators-on-cuda0-under-torchrun": (
        "train_MIAT.py", "load_estimators(args.estimators, distributed.process_device(args.device))",
        "load_estimators(args.estimators, distributed.resolve_device(args.device))",
        ["tests/test_namid.py::test_each_torchrun_process_puts_the_estimators_and_the_target_on_its_own_device"]),
    "nan-replaces-best": (
        "utils/training.py", "        if not _is_finite(value):\n            return False\n",
        "        if value is None:\n            return True\n",
        ["tests/test_training.py"]),
    "transfer-crafted-on-the-target": (
        "utils/evaluation.py", "                predicted, has_nan = predictions(model, output.x_adv.clamp(0, 1), device, amp)\n                target_outcomes",
        "                predicted, has_nan = predictions(model, attack.craft(model, x, y, generator).x_adv, device, amp)\n                target_outcomes",
        ["tests/test_evaluation.py::test_transfer_crafts_on_the_surrogate_and_checks_the_budget"]),
    "estimators-in-bf16-under-amp": (
        "utils/mi.py", "    with torch.autocast(device_type=tensor.device.type, enabled=False):\n        yield",
        "    yield",
        ["tests/test_mi.py", "tests/test_namid.py::test_step_runs_the_estimators_in_float32_under_bf16_autocast"]),
    "global-head-separate-passes": (
        "utils/mi.py", "return estimator.encode_global(torch.cat([logits_nat, logits_adv])).chunk(2)",
        "return estimator.encode_global(logits_nat), estimator.encode_global(logits_adv)",
        ["tests/test_mi.py"]),
    "stage2-selects-on-the-objective": (
        "utils/estimator_training.py", 'SELECT_KEY = "val_mi_selection"', 'SELECT_KEY = "val_objective"',
        ["tests/test_estimator_scripts.py::test_end_to_end_outputs_and_frozen_target"]),
    "validation-attack-reseeded-per-epoch": (
        "utils/training.py", "eval_attack, device, seed=args.seed, amp", "eval_attack, device, seed=args.seed + 1000 * epoch, amp",
        ["tests/test_training.py::test_one_validation_attack_seed_for_every_epoch"]),
    "namid-clean-forward-updates-bn": (
        "utils/namid.py", "outputs_nat = clean_logits_in_train_mode(model, x, objective, bn_stats, for_mi=True, head=head)",
        "outputs_nat = model(x)",
        ["tests/test_training.py::test_bn_running_statistics_follow_the_policy"]),
    "selection-argmax-over-the-batch": (
        "utils/mi.py", "return (logits_nat.argmax(dim=1) == y) & (logits_adv.argmax(dim=1) != y)",
        "return (logits_nat.softmax(dim=0).argmax(dim=1) == y) & (logits_adv.softmax(dim=0).argmax(dim=1) != y)",
        ["tests/test_mi.py::test_selection_uses_argmax_over_classes",
         "tests/test_namid.py::test_end_to_end_writes_every_output"]),
    "shuffled-reference-not-shuffled": (
        "utils/estimator_training.py", "pairing = derangement(len(y), shuffler).to(device)",
        "pairing = torch.arange(len(y), device=device)",
        ["tests/test_informativeness.py::test_collect_mi_reference_is_the_same_estimator_on_deranged_pairs"]),
    "adversarial-estimator-judged-on-all-samples": (
        "utils/estimator_training.py", '"adversarial": ("E_a", "adv_mi_adv", "fooled",', '"adversarial": ("E_a", "adv_mi_adv", None,',
        ["tests/test_informativeness.py::test_collect_mi_reference_is_the_same_estimator_on_deranged_pairs"]),
    "verdict-ignores-the-shuffled-reference": (
        "utils/estimator_training.py", "    elif not (math.isfinite(gain) and gain >= margin_shuffled):",
        "    elif False:",
        ["tests/test_informativeness.py::test_judge_estimator_by_hand"]),
    "stage3-accepts-uninformative-estimators": (
        "train_MIAT.py", "    if reason is None:\n        return True\n", "    if True:\n        return True\n",
        ["tests/test_informativeness.py::test_stage3_refuses_uninformative_estimators_unless_allowed"]),
    "bounded-eq5-unclamped": (
        "utils/mi.py", "subtracted_nat.clamp_min(0), subtracted_adv.clamp_min(0)", "subtracted_nat, subtracted_adv",
        ["tests/test_informativeness.py::test_bounded_eq5_clamps_each_subtracted_estimate_at_zero"]),
    "alpha-warmup-ignored": (
        "utils/namid.py", "weight = alpha_at(schedule.adversarial_epochs(index)) if alpha_warmup_epochs > 0 else alpha",
        "weight = alpha", ["tests/test_namid.py::test_the_step_weights_l_mi_by_the_ramped_alpha"]),
    "min-selected-ignored": (
        "utils/namid.py", "if int(selected.sum()) < max(min_selected, 1) or not which:", "if not selected.any() or not which:",
        ["tests/test_namid.py::test_l_mi_is_off_in_batches_whose_selection_is_smaller_than_min_selected"]),
    "running-stages-share-a-gpu": (
        "utils/pipeline.py", "group = free_groups.pop(0)", "group = free_groups[0]",
        ["tests/test_launch.py::test_running_stages_never_share_a_gpu"]),
    "stage2-gradients-not-averaged": (
        "utils/estimator_training.py", "        distributed.average_gradients_before_each_step(optimizer)\n", "",
        ["tests/test_estimator_scripts.py::test_two_process_torchrun_averages_the_estimators_and_judges_every_held_out_sample"]),
    "evaluation-batches-share-one-seed": (
        "utils/evaluation.py", "return (seed * 7_919 + batch_index) % (2 ** 62)", "return seed",
        ["tests/test_sharded_eval.py::test_a_batch_gets_the_same_adversarials_whichever_process_attacks_it"]),
    "evaluation-seeded-per-process": (
        "utils/evaluation.py", "    seed = batch_seed(seed, batch_index)\n", "    seed = seed + distributed.rank()\n",
        ["tests/test_sharded_eval.py::test_a_batch_gets_the_same_adversarials_whichever_process_attacks_it"]),
    "sharded-evaluation-not-gathered": (
        "utils/distributed.py", "    dist.all_gather_object(gathered, obj)\n    return gathered",
        "    return [obj] + [[] for _ in range(dist.get_world_size() - 1)]",
        ["tests/test_sharded_eval.py::test_two_processes_write_the_single_process_results"]),
    "slurm-no-dependencies": (
        "utils/slurm.py", "after_ok=[by_name[dep] for dep in task.deps if dep in by_name])", "after_ok=[])",
        ["tests/test_slurm.py::test_each_stage_is_a_job_after_the_jobs_of_the_stages_it_reads"]),
    "slurm-done-stages-get-jobs": (
        "utils/slurm.py", 'if task_state(task) == "done" and not any', 'if False and not any',
        ["tests/test_slurm.py::test_finished_stages_get_no_job_and_are_no_dependency"]),
    "slurm-queued-jobs-submitted-again": (
        "utils/slurm.py", "        job.id, job.reused = queued[0][0], True\n", "        pass\n",
        ["tests/test_slurm.py::test_a_resubmission_depends_on_the_jobs_still_queued_instead_of_submitting_them_again"]),
    "autoattack-sees-bf16-logits": (
        "utils/evaluation.py", "adversary = cls(Float32Logits(model).eval(), **kwargs)", "adversary = cls(model, **kwargs)",
        ["tests/test_evaluation.py::test_autoattack_runs_the_standard_version_exactly"]),
    "device-data-never-flips": (
        "utils/data.py", "columns = left[:, None] + torch.where(flip[:, None].bool(), columns.flip(1), columns)",
        "columns = left[:, None] + columns",
        ["tests/test_gpu_speed.py::test_device_images_serve_the_host_loaders_cifar_batches"]),
    "pgd-update-not-projected": (
        "utils/attacks.py", "    delta = project(delta, norm, epsilon)\n    return (x + delta).clamp(0, 1) - x",
        "    return (x + delta).clamp(0, 1) - x",
        ["tests/test_attacks.py"]),
    "stage2-held-out-values-of-rank-0-only": (
        "utils/estimator_training.py", "distributed.interleave_shards(torch.cat(chunks))", "torch.cat(chunks)",
        ["tests/test_estimator_scripts.py::test_two_process_torchrun_averages_the_estimators_and_judges_every_held_out_sample"]),
    "pgd-mt-one-target": (
        "utils/evaluation.py", "for rank in range(min(targets, ranked.shape[1]))]", "for rank in range(1)]",
        ["tests/test_adaptive_attacks.py::test_pgd_mt_reaches_a_class_that_untargeted_margin_pgd_and_the_first_target_miss"]),
    "p-variants-without-the-softmax": (
        "utils/evaluation.py", "return F.softmax(self.model(x).float(), dim=1)", "return self.model(x).float()",
        ["tests/test_adaptive_attacks.py::test_p_variants_ascend_the_cross_entropy_on_the_averaged_probabilities"]),
    "restarts-and-targets-keep-the-last-success": (
        "utils/evaluation.py", "unbroken[index[broken]] = False", "unbroken[index[broken]] = True",
        ["tests/test_adaptive_attacks.py::test_first_success_keeps_each_examples_first_adversarial_and_attacks_only_the_unbroken",
         "tests/test_adaptive_attacks.py::test_pgd_restarts_is_robust_only_where_every_restart_failed_and_keeps_the_first_success"]),
    "targeted-margin-masked-by-multiplication": (
        "utils/attacks.py", "return -cw_margin(logits, target)",
        "return logits.gather(1, target[:, None]).squeeze(1) - (logits * (1 - F.one_hot(target, logits.shape[1]))).amax(dim=1)",
        ["tests/test_adaptive_attacks.py::test_targeted_margin_by_hand_on_all_negative_logits"]),
    "mim-momentum-unguarded": (
        "utils/attacks.py", "grad / torch.where(scale > 0, scale, torch.ones_like(scale))", "grad / scale",
        ["tests/test_adaptive_attacks.py::test_mim_carries_its_momentum_over_a_zero_gradient"]),
    # issue 12: the seed talk's heads
    "mm-centers-unscaled": (
        "defenses/max_mahalanobis.py", "    return scale * mu\n", "    return mu\n",
        ["tests/test_defenses.py::test_centers_form_a_regular_simplex_of_norm_c"]),
    "mm-lda-on-distances": (
        "defenses/max_mahalanobis.py", "            return z @ self.centers.t()", "            return -squared_distances(z, self.centers)",
        ["tests/test_defenses.py::test_mm_lda_logits_give_the_softmax_of_the_distance_form"]),
    "mmc-training-attack-on-saturated-ce": (
        "defenses/__init__.py", 'return "cw" if self.name == "mmc" else "ce"', 'return "ce"',
        ["tests/test_defenses.py::test_objectives_with_heads"]),
    "adp-at-without-the-clean-term": (
        "defenses/__init__.py", "        return self.is_ensemble\n", "        return False\n",
        ["tests/test_defenses.py::test_standard_at_uses_the_heads_loss",
         "tests/test_defenses.py::test_adversarial_step_of_an_ensemble_trains_on_its_members"]),
    "ensemble-logits-average-the-logits": (
        "defenses/adp.py", "    return torch.logsumexp(F.log_softmax(member_logits.float(), dim=-1), dim=1) - torch.log(torch.tensor(float(k)))",
        "    return member_logits.float().mean(dim=1)",
        ["tests/test_defenses.py::test_ensemble_exposes_the_log_of_its_averaged_probabilities"]),
    "adp-diversity-keeps-the-true-label": (
        "defenses/adp.py", "    keep = ~F.one_hot(y, num_classes).bool()", "    keep = ~F.one_hot((y + 1) % num_classes, num_classes).bool()",
        ["tests/test_defenses.py::test_adp_loss_matches_a_hand_computation"]),
    "namid-head-not-taken-from-the-estimators": (
        "train_MIAT.py", 'args.head = args.head or estimator_checkpoint["target_spec"].get("head", "softmax")',
        'args.head = args.head or "softmax"',
        ["tests/test_defenses.py::test_namid_takes_the_head_of_the_estimators_target"]),
    "namid-base-loss-ignores-the-head": (
        "utils/namid.py", "        base = training_loss(objective, head, outputs_nat, outputs_adv, y, beta)",
        "        base = objective.loss(head.logits(outputs_nat), head.logits(outputs_adv), y, beta)",
        ["tests/test_defenses.py::test_namid_on_a_head_reads_its_logits_and_its_loss"]),
    # issue 14: label MI I(Y; Y^) in stage 4
    "label-mi-column-from-correctness": (
        "utils/evaluation.py", "        return hard_label_mi(self.predicted, self.labels)\n",
        "        return hard_label_mi(torch.where(self.robust, self.labels, (self.labels + 1) % (int(self.labels.max()) + 1)), self.labels)\n",
        ["tests/test_label_mi.py::test_stage4_label_mi_column_is_the_plug_in_of_the_per_example_predictions"]),
    "label-mi-attack-maximises": (
        "utils/attacks.py", "return -label_mi(F.softmax(logits.float(), dim=1), y)",
        "return label_mi(F.softmax(logits.float(), dim=1), y)",
        ["tests/test_label_mi.py::test_the_label_mi_attack_lowers_label_mi_more_than_ce_pgd"]),
    # issue 13: RCE and its detectors, mixup inference
    "rce-logits-not-reversed": (
        "defenses/rce.py", "        return -self.network(x)", "        return self.network(x)",
        ["tests/test_rce.py::test_the_model_exposes_minus_z_and_predicts_argmin_z"]),
    "detector-aware-attack-ignores-the-detectors": (
        "utils/detection.py", "    return margin + c * penalty", "    return margin",
        ["tests/test_detectors.py::test_aware_objective_is_the_capped_margin_plus_the_detectors_shortfalls"]),
    "mixup-inference-ol-may-draw-the-prediction": (
        "defenses/mixup_inference.py", "        shift = torch.randint(1, num_classes,", "        shift = torch.randint(0, num_classes,",
        ["tests/test_mixup.py::test_ol_never_draws_the_predicted_class_and_draws_every_other"]),
    "mixup-inference-pool-from-the-test-set": (
        "defenses/mixup_inference.py", '    subset = splits.val if source == "val" else splits.train',
        '    subset = splits.test',
        ["tests/test_mixup.py::test_pool_is_the_validation_split_never_the_test_set"]),
    "iat-attacks-the-true-labels": (
        "defenses/mixup_inference.py", "        x_adv = pgd_attack(plain, x, predicted, config, generator)",
        "        x_adv = pgd_attack(plain, x, y, config, generator)",
        ["tests/test_mixup.py::test_iat_attacks_the_predicted_labels_not_the_true_ones"]),
    # stage 4's --resume
    "eval-journal-ignores-its-fingerprint": (
        "utils/eval_journal.py", "            if read is None or read[0] != text:", "            if read is None:",
        ["tests/test_resumable_eval.py::test_a_journal_made_with_other_settings_is_not_used"]),
    # test_detection.py --resume, provenance of resumed runs and studies, NAMID on RCE, He et al.'s ResNets
    "detection-journal-never-read": (
        "utils/detection.py", "            if journal is not None and index in journal.done:",
        "            if False:",
        ["tests/test_detectors.py::test_an_interrupted_detection_evaluation_resumes_to_the_uninterrupted_results"]),
    "detection-journal-blind-to-the-detectors": (
        "test_detection.py", '"detectors": asdict(setting), ', "",
        ["tests/test_detectors.py::test_an_interrupted_detection_evaluation_resumes_to_the_uninterrupted_results"]),
    "detection-cw-at-the-old-step": (
        "test_detection.py", '"--cw-lr", type=positive_number, default=0.1,', '"--cw-lr", type=positive_number, default=0.01,',
        ["tests/test_detectors.py::test_default_cw_fools_nearly_every_correctly_classified_image_of_a_ce_model"]),
    "all-three-at-each-detectors-own-fpr": (
        "defenses/detectors.py", "torch.stack([scores[name] >= self.combined[name] for name in DETECTORS])",
        "torch.stack([scores[name] >= self.thresholds[name] for name in DETECTORS])",
        ["tests/test_detectors.py::test_all_three_together_reject_the_fpr_not_three_times_it"]),
    "detection-worst-case-is-the-last-attack": (
        "utils/detection.py", "            survives &= (adv.predicted == labels) | ~adv.accepted[name]\n",
        "            survives = clean_correct & clean.accepted[name] & ((adv.predicted == labels) | ~adv.accepted[name])\n",
        ["tests/test_detectors.py::test_worst_case_counts_an_example_only_if_it_survives_every_attack"]),
    "detection-worst-case-without-autoattack": (
        "utils/detection.py", 'BOUNDED_ATTACKS = ("fgsm", "bim", "ilcm", "aware", "aa")',
        'BOUNDED_ATTACKS = ("fgsm", "bim", "ilcm", "aware")',
        ["tests/test_detectors.py::test_end_to_end_writes_every_output"]),
    "combined-worst-case-skips-the-clean-check": (
        "bench/detection_worst_case.py", 'if record["clean"]["per_example"] != first["clean"]["per_example"]:',
        'if False:',
        ["tests/test_detectors.py::test_combining_evaluations_of_the_same_model_gives_the_joint_runs_worst_case"]),
    "detection-aware-attack-three-targets": (
        "utils/detection.py", "targets = min(args.aware_targets or num_classes - 1, num_classes - 1)",
        "targets = min(args.aware_targets or 3, num_classes - 1)",
        ["tests/test_detectors.py::test_the_detector_aware_attack_targets_every_wrong_class_by_default"]),
    "resumed-training-leaves-no-record": (
        "utils/training.py", "            self.run_dir.record_resume(self.start_epoch)\n", "",
        ["tests/test_train_standard.py::test_sigkill_then_resume_finishes_the_run"]),
    "study-commits-ignore-resumptions": (
        "utils/study.py", ' + [resume.get("git_commit") for resume in record.get("resumes", [])]', "",
        ["tests/test_reproduce.py::test_a_study_run_by_several_commits_names_the_stages_of_each"]),
    "namid-on-rce-trains-on-ce": (
        "defenses/__init__.py", "        if self.name == \"rce\":\n            return rce_loss(outputs, y)\n", "",
        ["tests/test_defenses.py::test_namid_on_a_head_reads_its_logits_and_its_loss[rce]"]),
    "resnet20-at-resnet18-width": (
        "models/__init__.py", 'DEFAULT_WIDTH = {"resnet20": 16, "resnet32": 16}', "DEFAULT_WIDTH = {}",
        ["tests/test_models.py::test_width_defaults_to_the_papers_per_architecture"]),
    "paired-discordant-counts-every-baseline-success": (
        "utils/paired.py", "    only_second = sum(b and not a for a, b in zip(first, second))",
        "    only_second = sum(b for a, b in zip(first, second))",
        ["tests/test_paired.py::test_mcnemar_exact_p_values_by_hand"]),
    "namid-t-paired-with-standard-at": (
        "utils/pipeline.py", 'baseline="trades"),', "),",
        ["tests/test_paired.py::test_the_study_pairs_each_namid_row_with_its_baseline_per_seed"]),
    "mixup-inference-journal-never-read": (
        "test_mixup_inference.py", "                if journal is not None and repeat in journal.done:",
        "                if False:",
        ["tests/test_mixup.py::test_an_interrupted_mixup_inference_evaluation_resumes_to_the_uninterrupted_results"]),
    "mixup-inference-journal-blind-to-the-settings": (
        "test_mixup_inference.py", '"pass": pass_key(mode, metric), "settings": settings,', '"pass": pass_key(mode, metric),',
        ["tests/test_mixup.py::test_an_interrupted_mixup_inference_evaluation_resumes_to_the_uninterrupted_results"]),
    "pgd-outdone-check-counts-the-label-mi-attack": (
        "utils/evaluation.py", "                and name not in LABEL_MI_ATTACKS}", "}",
        ["tests/test_evaluation.py::test_sanity_warnings_name_a_model_at_chance_and_pgd_outdone_by_a_stronger_attack"]),
    "reuse-ignores-the-inputs": (
        "utils/pipeline.py", "    return (twin, record) if record.get(\"inputs\") == hashes else None", "    return twin, record",
        ["tests/test_reproduce.py::test_reuse_copies_exactly_the_stages_finished_elsewhere_with_the_same_command_and_inputs"]),
    "reuse-ignores-the-command-line": (
        "utils/pipeline.py", "    if theirs is None or relocated(task.argv, str(out), theirs) != argv:", "    if theirs is None:",
        ["tests/test_reproduce.py::test_reuse_copies_exactly_the_stages_finished_elsewhere_with_the_same_command_and_inputs"]),
    "reuse-overwrites-a-stage-begun-here": (
        "utils/pipeline.py", "        if task.run_dir.exists() and any(task.run_dir.iterdir()):", "        if False:",
        ["tests/test_reproduce.py::test_reuse_copies_exactly_the_stages_finished_elsewhere_with_the_same_command_and_inputs"]),
    "at-attack-loss-not-passed-to-training": (
        "utils/training.py", 'getattr(args, "at_attack_loss", None))', "None)",
        ["tests/test_train_standard.py::test_at_attack_loss_cw_trains_softmax_at_on_the_cw_margin"]),
    "process-group-pinned-past-cleanup": (
        "utils/distributed.py", "    import torch._dynamo  # noqa: F401\n", "",
        ["tests/test_distributed.py::test_gradients_are_averaged_and_drift_is_caught"]),
}


def check(name) -> bool:
    """True when the mutation is caught (its tests fail)."""
    file, original, mutated, tests = MUTATIONS[name]
    path = REPO / file
    text = path.read_text()
    if text.count(original) != 1:
        raise SystemExit(f"{name}: the original text is not found exactly once in {file}; update the mutation")
    try:
        path.write_text(text.replace(original, mutated))
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-rf", "-p", "no:cacheprovider", *tests],
                                cwd=REPO, capture_output=True, text=True)
    finally:
        path.write_text(text)
    failed = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("FAILED ")]
    caught = result.returncode != 0
    detail = f"by {failed[0]}" if failed else (result.stdout.strip().splitlines() or ["(no output)"])[-1]
    print(f"{'caught  ' if caught else 'SURVIVED'} {name}: {detail}", flush=True)
    return caught


def main(names):
    unknown = [n for n in names if n not in MUTATIONS]
    if unknown:
        raise SystemExit(f"unknown mutation(s): {', '.join(unknown)}; choose from {', '.join(MUTATIONS)}")
    survived = [name for name in (names or MUTATIONS) if not check(name)]
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
