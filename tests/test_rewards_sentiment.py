"""The sentiment kind: VADER's compound score."""

from __future__ import annotations

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from raft_stream.rewards.sentiment import VaderReward


def test_vader_reward_is_the_compound_score() -> None:
    texts = ["A wonderful, moving film.", "Dull and far too long.", "It is a film."]
    expected = [SentimentIntensityAnalyzer().polarity_scores(t)["compound"] for t in texts]
    assert VaderReward()(["Review:"] * 3, texts) == expected


def test_vader_reward_ranks_positive_above_negative() -> None:
    good, bad = VaderReward()(["", ""], ["I loved it, great acting!", "I hated it, awful acting."])
    assert good > 0 > bad


def test_vader_reward_scores_prompt_plus_response_when_score_prompt() -> None:
    prompt, response = "This terrible, boring movie", " was shown on Tuesday."
    alone = VaderReward()([prompt], [response])
    with_prompt = VaderReward(score_prompt=True)([prompt], [response])
    assert alone == [0.0]
    assert with_prompt[0] < 0
