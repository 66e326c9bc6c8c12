"""Where labelled images come from: each dataset's own files read into cxrlearn's table, and the download.

``nih``: ChestX-ray14's label table and official lists (shipped in ``tables/``); ``boxes``: its
radiologists' boxes; ``expert_labels``: Google's expert labels; ``download``: its archives, checked.
Every reader returns the frame that :mod:`cxrlearn.data.columns` describes.
"""
