"""The sentiment kind: VADER's compound score, in [-1, 1] (Hutto & Gilbert, ICWSM 2014).

Example:
    >>> VaderReward()([""], ["What a wonderful, moving film."])
    [0.5719]
"""

from __future__ import annotations

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from raft_stream.rewards.base import TextReward


class VaderReward(TextReward):
    """VADER compound sentiment of each response; positive text scores above 0."""

    def __init__(self, *, score_prompt: bool = False) -> None:
        super().__init__(score_prompt=score_prompt)
        # Building the analyzer parses the lexicon files (~10 ms): do it once, not per call.
        self.analyzer = SentimentIntensityAnalyzer()

    def score_texts(self, texts: list[str]) -> list[float]:
        return [self.analyzer.polarity_scores(text)["compound"] for text in texts]
