"""File formats, at the bottom of the house: they import nothing of mdref, and everything that reads or writes a
file reads it through here.

    safetensors.py   safetensors reading / writing per the format's spec (never unpickle), schema checks, nesting,
                     seeded weights, file hashes
    json_files.py    JSON objects from files: UTF-8, no duplicate keys, bounded nesting (ConfigError)
    resources.py     where the files shipped with mdref live (weights/ or mdref/_weights/)
"""
