"""Data: reading user text (text.py), token shards and the batch loader (shards.py), the built-in world,
training objectives and chat/preference data. Import the submodules directly."""
