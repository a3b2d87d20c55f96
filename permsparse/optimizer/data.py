"""TEMPORARY re-export while helpers migrate: moved to permsparse.data.{feeds,text,kinds,images}. Removed before landing."""
from permsparse.data.feeds import *
from permsparse.data.feeds import lm_text_feeds, make_feeds, text_feeds, token_feeds
from permsparse.data.kinds import model_kind, vocab_size
from permsparse.data.text import builtin_texts, load_tokenizer
