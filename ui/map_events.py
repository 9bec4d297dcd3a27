"""The settings' and the map's events: settings applied (the map redrawn), views, the image picker, clicks on
the map (what a patch is; Manual's picks). Methods of Handlers (handlers.py)."""

import logging
from types import SimpleNamespace

import gradio as gr

from pipeline import InputError
from pipeline.heatmap import describe, hit
from pipeline.methods import registry
from pipeline.methods.visionzip import BUDGETS

from .text import checked_radius, method_names, picks_text, settings_from

log = logging.getLogger("zipchat")


def picks_shown(label) -> bool:
    """Whether the method the page names `label` (a UI label) is picked by hand: the picking tools show."""
    name = method_names().get(label) if isinstance(label, str) else None
    return name is not None and registry.get(name).kind == registry.MANUAL


class MapEvents:
    def compress_latest(self, state):
        """Encodes the image the map shows for the current settings. Fails only with a gr.Error (on
        ZeroGPU any other exception would reach the page as its bare class name)."""
        try:
            self.session_for(state).current_view(key=self.shown_key(state))
        except InputError as e:
            raise gr.Error(str(e)) from None
        except Exception as e:
            log.exception("encoding the image failed")
            raise gr.Error(f"Encoding the image failed: {type(e).__name__}: {e}") from None
        return state

    def apply_settings(self, state, view, *settings):
        if state is None:
            return state, gr.skip(), gr.skip(), gr.skip(), gr.update(visible=picks_shown(settings[0]))
        session = self.session_for(state)
        try:
            session.set_method(**settings_from(*settings))
        except InputError as e:
            gr.Warning(str(e))
            s = state.chat.settings
            return (state, gr.skip(), f"⚠️ Not applied: {e} Still using {s.method} ({s.dominant} + {s.contextual}).",
                    gr.skip(), gr.skip())
        if state.chat.last_image_key is not None and session.current_view(compress=False,
                                                                          key=self.shown_key(state)) is None:
            try:
                state = self.compress_latest(state)
            except gr.Error as e:  # the settings stay applied; the map waits for the next answer
                return state, gr.skip(), f"⚠️ {e.message}", gr.skip(), gr.skip()
        return state, *self.views(state, view), gr.update(visible=session.method.kind == registry.MANUAL)

    @staticmethod
    def readout_after_message(state):
        """A message with images moves the map to the newest one: the click readout, about the image shown before,
        is cleared; a question alone keeps it."""
        if state is not None and state.chat.pending:
            return ""
        return gr.skip()

    def show_view(self, state, view):
        return self.views(state, view)[:2]

    def image_choices(self, state):
        """The picker of the image the map shows: one choice per image of the conversation (shown when
        there are several); and for a clip, the slider of the frame it shows alone (0: all its frames)."""
        keys = list(state.chat.images) if state is not None else []
        shown = self.shown_key(state)
        frames = state.chat.clips[shown]["crops"] if shown in getattr(state.chat, "clips", {}) else 0
        return (gr.update(choices=[(f"image {i + 1}", str(i + 1)) for i in range(len(keys))], visible=len(keys) > 1,
                          value=str(keys.index(shown) + 1) if shown in keys else None),
                gr.update(maximum=max(1, frames), visible=frames > 1,
                          value=0 if state is None or state.map_frame is None else state.map_frame + 1))

    def show_frame(self, state, number, view):
        """The map shows frame `number` of the clip it shows (1-based; 0: all its frames)."""
        key = self.shown_key(state) if state is not None else None
        frames = state.chat.clips[key]["crops"] if key in getattr(state.chat, "clips", {}) else 0
        if isinstance(number, bool) or not isinstance(number, (int, float)) or number != int(number) \
                or not 0 <= number <= frames or not frames:
            return state, gr.skip(), "⚠️ " + (f"Frames are 0 (all) to {frames} here (got {number!r})." if frames
                                              else "The map shows no clip."), gr.skip(), ""
        state.map_frame = int(number) - 1 if number else None
        return state, *self.views(state, view), ""

    def show_image(self, state, number, view):
        """The map shows image `number` (1-based, as the picker names them): its picks, clicks and views."""
        keys = list(state.chat.images) if state is not None else []
        try:
            index = int(number) - 1
        except (TypeError, ValueError):
            index = -1
        if not 0 <= index < len(keys):
            return state, gr.skip(), f"⚠️ No image {number!r} in this conversation ({len(keys)} images).", gr.skip(), ""
        state.map_key, state.map_frame = keys[index], None
        if self.session_for(state).current_view(compress=False, key=state.map_key) is None:
            try:
                state = self.compress_latest(state)
            except gr.Error as e:
                return state, gr.skip(), f"⚠️ {e.message}", gr.skip(), ""
        return state, *self.views(state, view), ""

    def click_map(self, state, view, radius, evt):
        """On the map: say what the clicked patch is; in the manual method, pick or unpick it (and the
        patches around it, `radius`). `evt`: the click (app.MapClick)."""
        if state is None or state.chat.last_image_key is None:
            return state, gr.skip(), gr.skip(), "_Upload an image, then click the map._"
        if not isinstance(evt.index, (list, tuple)) or len(evt.index) < 2:  # an API call sends no click: /click_at
            return state, gr.skip(), gr.skip(), "_Click a patch of the map (through the API: /click_at with x and y " \
                                                "in the map's pixels)._"
        session, key = self.session_for(state), self.shown_key(state)
        shown = session.current_view(compress=False, key=key, frame=state.map_frame)
        if shown is None:
            return state, gr.skip(), gr.skip(), "_The map is being prepared._"
        image, comp = shown
        spot = hit(comp, *evt.index[:2], self.display(state))
        if spot is None:
            return state, gr.skip(), gr.skip(), "_Click on a patch of the photo._"
        crop, unit = spot
        if registry.get(state.chat.settings.method).kind != registry.MANUAL:
            guidance = session.guidance_view(key, state.map_frame)
            importance = guidance[2] if guidance is not None else None
            source = registry.label(session.last_turn.guidance.source) if guidance is not None else "SGL"
            marked = self.views(state, view, session, mark=spot)[0]
            return state, marked, gr.skip(), describe(comp, crop, unit, importance, source)
        try:
            picked = session.toggle_pick(crop, unit, radius=int(checked_radius(radius)), key=key)
        except InputError as e:
            return state, gr.skip(), gr.skip(), f"⚠️ {e}"
        mapped, caption, _ = self.views(state, "kept", session, mark=spot)
        return state, mapped, caption, f"{picks_text(picked, self.image_name(state, key))} Ask again to answer with " \
                                       "exactly these."

    def click_at(self, state, view, radius, x, y):
        """A click at (x, y), in the map image's pixels, from the API (`/click_at`): as a click on the map."""
        for name, value in (("x", x), ("y", y)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 100_000:
                return state, gr.skip(), gr.skip(), f"⚠️ {name} must be a pixel of the map (got {value!r})."
        return self.click_map(state, view, radius, SimpleNamespace(index=[x, y]))

    def set_picks(self, state, start_from_visionzip: bool):
        if state is None or state.chat.last_image_key is None:
            return state, gr.skip(), gr.skip(), "_Upload an image first._"
        session, key = self.session_for(state), self.shown_key(state)
        if not session.cached(key, method=session.method.fallback or "visionzip"):
            return state, gr.skip(), gr.skip(), "_The map is being prepared; try again in a moment._"
        picked = session.picks_from_visionzip(key) if start_from_visionzip else (session.set_picks({}, key) or 0)
        mapped, caption, _ = self.views(state, "kept", session)
        return state, mapped, caption, picks_text(picked, self.image_name(state, key))

    @staticmethod
    def pick_budget(total):
        if total not in BUDGETS:
            return gr.skip(), gr.skip()
        return BUDGETS[total]
