"""Reference pictures for the ControlNet tests: a drawn rectangle and where edges should be."""


import numpy as np

# The rectangle drawn on every reference picture: columns 80..175, rows 64..191 (inclusive).
TOP, BOTTOM, LEFT, RIGHT = 64, 191, 80, 175


def rectangle(width: int = 256, height: int = 256) -> np.ndarray:
    image = np.zeros((height, width, 3), np.uint8)
    image[TOP:BOTTOM + 1, LEFT:RIGHT + 1] = (230, 40, 40)
    return image


def edge_map(width: int = 256, height: int = 256) -> np.ndarray:
    """The rectangle's outline, white on black: a canny map as `preprocess: false` takes it."""
    image = np.zeros((height, width, 3), np.uint8)
    image[[TOP, BOTTOM], LEFT:RIGHT + 1] = 255
    image[TOP:BOTTOM + 1, [LEFT, RIGHT]] = 255
    return image


def on_border(mask: np.ndarray, tolerance: int = 1) -> tuple[float, float]:
    """(share of edge pixels within `tolerance` of the rectangle's border, share of the border's
    pixels with an edge pixel within `tolerance`)."""
    rows, cols = np.nonzero(mask)
    near_row = (np.abs(rows - TOP) <= tolerance) | (np.abs(rows - BOTTOM) <= tolerance)
    near_col = (np.abs(cols - LEFT) <= tolerance) | (np.abs(cols - RIGHT) <= tolerance)
    inside_rows = (rows >= TOP - tolerance) & (rows <= BOTTOM + tolerance)
    inside_cols = (cols >= LEFT - tolerance) & (cols <= RIGHT + tolerance)
    precise = ((near_row & inside_cols) | (near_col & inside_rows)).mean()
    border = np.zeros_like(mask, dtype=bool)
    border[[TOP, BOTTOM], LEFT:RIGHT + 1] = True
    border[TOP:BOTTOM + 1, [LEFT, RIGHT]] = True
    grown = np.zeros_like(border)
    for dy in range(-tolerance, tolerance + 1):
        for dx in range(-tolerance, tolerance + 1):
            grown |= np.roll(np.roll(mask.astype(bool), dy, axis=0), dx, axis=1)
    covered = (grown & border).sum() / border.sum()
    return float(precise), float(covered)
