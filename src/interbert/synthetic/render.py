"""Small flat pictures of generated scenes (Pillow), for looking at and for the web page."""

from __future__ import annotations

import io
import math

from PIL import Image, ImageDraw

from interbert.synthetic.scenes import Scene, SceneObject

RGB = {
    "red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 119, 180), "yellow": (240, 200, 30),
    "purple": (148, 103, 189), "orange": (255, 127, 14), "brown": (140, 86, 75), "gray": (127, 127, 127),
}
BACKGROUND = (236, 234, 226)


def _shade(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(max(0, min(255, int(c * factor))) for c in rgb)


def _draw_object(draw: ImageDraw.ImageDraw, o: SceneObject) -> None:
    x1, y1, x2, y2 = o.box
    w, h = x2 - x1, y2 - y1
    fill, edge = RGB[o.colour], _shade(RGB[o.colour], 0.55)
    if o.kind == "cube":  # a square with a lighter top face
        draw.rectangle((x1, y1 + 0.2 * h, x2 - 0.2 * w, y2), fill=fill, outline=edge)
        draw.polygon([(x1, y1 + 0.2 * h), (x1 + 0.2 * w, y1), (x2, y1), (x2 - 0.2 * w, y1 + 0.2 * h)],
                     fill=_shade(fill, 1.25), outline=edge)
        draw.polygon([(x2 - 0.2 * w, y1 + 0.2 * h), (x2, y1), (x2, y2 - 0.2 * h), (x2 - 0.2 * w, y2)],
                     fill=_shade(fill, 0.8), outline=edge)
    elif o.kind == "ball":
        draw.ellipse((x1, y1, x2, y2), fill=fill, outline=edge)
        draw.ellipse((x1 + 0.25 * w, y1 + 0.2 * h, x1 + 0.45 * w, y1 + 0.4 * h), fill=_shade(fill, 1.4))
    elif o.kind == "cylinder":
        cap = 0.2 * h
        draw.rectangle((x1, y1 + cap / 2, x2, y2 - cap / 2), fill=fill)
        draw.ellipse((x1, y2 - cap, x2, y2), fill=fill, outline=edge)
        draw.line((x1, y1 + cap / 2, x1, y2 - cap / 2), fill=edge)
        draw.line((x2, y1 + cap / 2, x2, y2 - cap / 2), fill=edge)
        draw.ellipse((x1, y1, x2, y1 + cap), fill=_shade(fill, 1.25), outline=edge)
    elif o.kind == "cone":
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2 - 0.1 * h), (x1, y2 - 0.1 * h)], fill=fill, outline=edge)
        draw.ellipse((x1, y2 - 0.2 * h, x2, y2), fill=_shade(fill, 0.8), outline=edge)
    elif o.kind == "star":
        cx, cy, r_out = (x1 + x2) / 2, (y1 + y2) / 2, min(w, h) / 2
        points = []
        for k in range(10):
            r = r_out if k % 2 == 0 else 0.45 * r_out
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
        draw.polygon(points, fill=fill, outline=edge)
    elif o.kind == "ring":
        thickness = max(2, int(0.22 * min(w, h)))
        draw.ellipse((x1, y1, x2, y2), outline=fill, width=thickness)
    else:
        raise ValueError(f"no drawing for object kind {o.kind!r}")


def render_scene(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (scene.width, scene.height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    # Objects lower in the picture are nearer the viewer, so they are drawn last (on top).
    for o in sorted(scene.objects, key=lambda o: o.box[3]):
        _draw_object(draw, o)
    return image


def scene_png(scene: Scene) -> bytes:
    """PNG bytes; Pillow writes no time stamp, so the same scene gives the same bytes."""
    buffer = io.BytesIO()
    render_scene(scene).save(buffer, format="PNG", compress_level=1)  # speed over a few bytes
    return buffer.getvalue()
