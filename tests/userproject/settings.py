"""The user's own settings module (a generic name tokenmeter must not clash with)."""

import os

DATABASE_URL = os.environ["DATABASE_URL"]
DATA_DIR = os.environ["USERAPP_DATA_DIR"]
