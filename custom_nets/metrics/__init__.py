"""Clinical measurements MONAI's metrics lack (e.g. fetal head circumference in mm)."""
