"""One DataModule per benchmark: GLUE and offline tweet sentiment (text), VTAB-1k (images), commonsense (prompts);
your own text-classification files (``TextFilesDataModule``) and image folders (``ImageFolderDataModule``)."""

from flexlora_pl.data.commonsense import COMMONSENSE_SETS, PROMPT_TEMPLATES, CommonsenseDataModule, PromptTemplate
from flexlora_pl.data.digits_vtab import DigitsVTABDataModule, build_digits_vtab
from flexlora_pl.data.glue import GLUE_TASKS, GLUEDataModule, GlueTask
from flexlora_pl.data.image_folder import ImageFolderDataModule, ImageFolderError
from flexlora_pl.data.resumable import ResumableDataLoader, ResumableSampler, ResumableTrainingData
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
from flexlora_pl.data.text_files import TextFilesDataModule
from flexlora_pl.data.tweets import TWEET_LABEL_NAMES, TweetSentimentDataModule
from flexlora_pl.data.vtab import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VTAB_ALIASES,
    VTAB_GROUPS,
    VTAB_TASKS,
    VTABDataError,
    VTABDataModule,
    VTABTask,
    vtab_data_config,
    vtab_task,
    vtab_transform,
)

__all__ = [
    "COMMONSENSE_SETS",
    "GLUE_TASKS",
    "HIDDEN_LABEL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PROMPT_TEMPLATES",
    "TWEET_LABEL_NAMES",
    "VTAB_ALIASES",
    "VTAB_GROUPS",
    "VTAB_TASKS",
    "CommonsenseDataModule",
    "DataFileNotFoundError",
    "DigitsVTABDataModule",
    "GLUEDataModule",
    "GlueTask",
    "ImageFolderDataModule",
    "ImageFolderError",
    "PromptTemplate",
    "RawSplit",
    "ResumableDataLoader",
    "ResumableSampler",
    "ResumableTrainingData",
    "TextClassificationDataModule",
    "TextFilesDataModule",
    "TweetSentimentDataModule",
    "VTABDataError",
    "VTABDataModule",
    "VTABTask",
    "build_digits_vtab",
    "check_columns",
    "check_encoding",
    "default_tokenizer_path",
    "load_data_files",
    "vtab_data_config",
    "vtab_task",
    "vtab_transform",
]
