"""A row against its baseline (the defense it modifies) on the same test images: the difference of accuracy per
column and seed, and the exact McNemar test on the images where exactly one of the two models is right.

The difference of two accuracies measured on the same images is far less noisy than either accuracy: an image
that both models get right (or both wrong) says nothing about which is better. McNemar's test keeps only the
discordant images; under "no difference" each is equally likely to favour either model, so the number that
favours the first is Binomial(discordant, 1/2) (scipy's exact binomtest). It measures the test set's sampling
noise for these two trained models; the spread of the difference over seeds measures the training noise, and a
claim needs both (docs/method.md section 10).
"""
from scipy.stats import binomtest


def per_example_flags(record: dict, key: str) -> list:
    """One bool per test image of a test_comparison.py results.json model record: correct when clean ("clean"),
    under an attack (its key), or under every attack of a threat model and clean ("worst_<threat>"), as the
    record's own accuracies count them."""
    if key == "clean":
        return [bit == "1" for bit in record["clean"]["per_example"]]
    if key.startswith("worst_"):
        entry = record["worst_case"][key[len("worst_"):]]
        flags = per_example_flags(record, "clean")
        for attack in entry["attacks"]:
            flags = [a and b for a, b in zip(flags, per_example_flags(record, attack))]
        return flags
    return [bit == "1" for bit in record["attacks"][key]["per_example"]]


def mcnemar_p(only_first: int, only_second: int) -> float:
    """Exact two-sided McNemar p-value: only_first images right for the first model alone, only_second for the
    second alone (1.0 when no image is discordant)."""
    discordant = only_first + only_second
    return 1.0 if discordant == 0 else float(binomtest(only_first, discordant, 0.5).pvalue)


def paired_counts(first: list, second: list) -> dict:
    """The difference of accuracy (first - second, a fraction) and the discordant counts of two flag lists over
    the same images."""
    if len(first) != len(second):
        raise ValueError(f"paired flags need the same images ({len(first)} against {len(second)})")
    only_first = sum(a and not b for a, b in zip(first, second))
    only_second = sum(b and not a for a, b in zip(first, second))
    return {"difference": (only_first - only_second) / max(len(first), 1), "only_first": only_first,
            "only_second": only_second, "images": len(first), "p": mcnemar_p(only_first, only_second)}
