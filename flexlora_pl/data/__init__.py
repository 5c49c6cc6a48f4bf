"""Text classification data: a shared base ``LightningDataModule``, GLUE, and an offline tweet-sentiment set."""

from flexlora_pl.data.commonsense import COMMONSENSE_SETS, PROMPT_TEMPLATES, CommonsenseDataModule, PromptTemplate
from flexlora_pl.data.glue import GLUE_TASKS, GLUEDataModule, GlueTask
from flexlora_pl.data.text import (
    HIDDEN_LABEL,
    DataFileNotFoundError,
    RawSplit,
    TextClassificationDataModule,
    check_columns,
    check_encoding,
    default_tokenizer_path,
    load_data_files,
)
from flexlora_pl.data.tweets import TWEET_LABEL_NAMES, TweetSentimentDataModule

__all__ = [
    "COMMONSENSE_SETS",
    "GLUE_TASKS",
    "HIDDEN_LABEL",
    "PROMPT_TEMPLATES",
    "TWEET_LABEL_NAMES",
    "CommonsenseDataModule",
    "DataFileNotFoundError",
    "GLUEDataModule",
    "GlueTask",
    "PromptTemplate",
    "RawSplit",
    "TextClassificationDataModule",
    "TweetSentimentDataModule",
    "check_columns",
    "check_encoding",
    "default_tokenizer_path",
    "load_data_files",
]
