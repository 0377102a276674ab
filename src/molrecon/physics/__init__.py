"""MRI physics: centred FFTs, the SENSE operator, sampling masks."""
