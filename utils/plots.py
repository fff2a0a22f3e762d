"""The figures: stage 2's MI distributions (the paper's Fig. 2/4) and the study's training curves and
robust accuracy against epsilon. matplotlib with the Agg backend, PNG files."""
import numpy

from utils.mi import QUANTITY_LABELS

MI_PAIRS = (("nat_mi_clean", "nat_mi_adv", "natural MI"), ("adv_mi_clean", "adv_mi_adv", "adversarial MI"))


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def draw_mi_histograms(axes, values: dict, title_prefix: str = ""):
    """On two axes, histograms on the selected set X' of the natural MI (I_N(x; h(x)) against I_N(x; h(x~)))
    and the adversarial MI (I_A(n; h(x)) against I_A(n; h(x~))). values: numpy arrays of the four
    quantities and the boolean mask `selected`."""
    selected = numpy.asarray(values["selected"], dtype=bool)
    for axis, (clean, adv, label) in zip(axes, MI_PAIRS):
        pair = {name: numpy.asarray(values[name])[selected] for name in (clean, adv)}
        axis.set_title(f"{title_prefix}{label}, {int(selected.sum())} selected samples", fontsize=9)
        axis.set_xlabel("per-sample MI estimate")
        if not all(data.size for data in pair.values()):
            axis.text(0.5, 0.5, "no selected sample", ha="center", va="center", transform=axis.transAxes)
            continue
        bins = numpy.histogram_bin_edges(numpy.concatenate(list(pair.values())), bins=40)  # shared, so bars line up
        for (name, data), colour in zip(pair.items(), ("tab:blue", "tab:red")):
            axis.hist(data, bins=bins, alpha=0.6, color=colour, label=f"{QUANTITY_LABELS[name]} (mean {data.mean():.3f})")
        axis.legend(fontsize=7)


def plot_mi_distributions(runs: dict, path, title: str):
    """One row of histograms per estimator run: runs maps a row title to its values (see draw_mi_histograms)."""
    plt = _pyplot()
    figure, axes = plt.subplots(len(runs), 2, figsize=(10, 3.8 * len(runs)), squeeze=False)
    for row, (name, values) in zip(axes, runs.items()):
        draw_mi_histograms(row, values, f"{name}: " if len(runs) > 1 else "")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _mean_band(axis, x, series: list, label: str, colour):
    """Mean over seeds as a line, +- one standard deviation as a band (series: one list per seed)."""
    length = min(len(s) for s in series)
    data = numpy.array([s[:length] for s in series], dtype=float)
    mean = numpy.nanmean(data, axis=0)
    axis.plot(x[:length], 100 * mean, marker="o", markersize=3, label=label, color=colour)
    if len(series) > 1:
        std = numpy.nanstd(data, axis=0, ddof=1)
        axis.fill_between(x[:length], 100 * (mean - std), 100 * (mean + std), alpha=0.2, color=colour)


def plot_training_curves(curves: dict, path, title: str):
    """curves: defense label -> {"clean": [per-seed lists], "robust": [...], "split": "test"|"val"}."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.get_cmap("tab10")
    for index, (label, curve) in enumerate(curves.items()):
        for axis, key in zip(axes, ("clean", "robust")):
            epochs = numpy.arange(1, max(len(s) for s in curve[key]) + 1)
            _mean_band(axis, epochs, curve[key], label, colours(index))
    split = next(iter(curves.values()))["split"] if curves else "test"
    for axis, what in zip(axes, ("clean accuracy", "PGD accuracy")):
        axis.set_xlabel("epoch")
        axis.set_ylabel(f"{split} {what} (%)")
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.grid(alpha=0.3)
    axes[1].set_title("under the training stages' evaluation attack", fontsize=9)
    axes[1].legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_robustness_curves(curves: dict, epsilons: list, path, title: str):
    """curves: defense label -> per-seed lists of accuracy at each epsilon (the first epsilon is 0: clean)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    colours = plt.get_cmap("tab10")
    x = numpy.asarray(epsilons, dtype=float)
    for index, (label, series) in enumerate(curves.items()):
        _mean_band(axis, x, series, label, colours(index))
    axis.set_xlabel("epsilon (L-inf, pixel units)")
    axis.set_ylabel("PGD accuracy (%)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
