"""``visalign demo``: a Gradio app for personalised generation (the optional extra ``demo``).

A newcomer clicks the image they prefer in a few pairs (4 rounds by default), which gives their
user embedding (:mod:`visalign.personal`); then they type any prompt and get images for their
taste, with a slider from "base" to "personal" and a choice of route: training-free steering
with the personal reward, or the PPD user-conditioned model when one is given.

Runs on the testbed model out of the box (``assets/testbed/sd`` with the ``testbed`` encoder;
``assets/testbed/ppd/user_branch.safetensors`` when shipped), and on any SD/SDXL/SD3 folder with
any open_clip encoder. Binds to 127.0.0.1 unless ``host`` says otherwise; requests go through
Gradio's queue one at a time (the model is shared), so concurrent visitors wait their turn.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path
from typing import Any

import torch

from .config import SINGLE_FILE_CONFIG_HELP, ConfigError, configclass, field

logger = logging.getLogger(__name__)

TESTBED_MODEL = Path(__file__).resolve().parents[1] / "assets" / "testbed" / "sd"
TESTBED_PPD = Path(__file__).resolve().parents[1] / "assets" / "testbed" / "ppd" / "user_branch.safetensors"
CHOICE_PROMPTS = ("a red circle", "a blue square", "two yellow triangles", "a green circle and a red square",
                  "three blue circles", "a yellow square", "a red triangle", "two green squares")
ROUTE_LABELS = {"Steering (personal reward, no training)": "steer", "PPD (user-conditioned model)": "ppd"}


@configclass
class DemoConfig:
    model: str = field(str(TESTBED_MODEL), help="diffusers folder or single .safetensors file (default: the testbed model)")
    single_file_config: str | None = field(None, help=SINGLE_FILE_CONFIG_HELP)
    ppd: str | None = field(None, help="PPD user branch (safetensors); default: the testbed's when the model is the testbed's")
    encoder: str = field("testbed", help="image encoder of user embeddings: testbed, or an open_clip name/folder")
    pretrained: str | None = field(None, help="open_clip pretrained tag or file for encoder")
    rounds: int = field(4, help="pairwise choices before generating (at least 4)")
    steps: int = field(20, help="sampling steps")
    guidance_scale: float = field(5.0, help="classifier-free guidance")
    num_images: int = field(4, help="images per prompt")
    particles: int = field(4, help="steering route: FK particles per image")
    display_size: int = field(192, help="pixels images are shown at (small models are upscaled)")
    host: str = field("127.0.0.1", help="address to bind; 0.0.0.0 exposes the demo to the network")
    port: int = field(7860, help="port")
    device: str = field("auto", help="auto, cpu, cuda, ...")
    seed: int = field(0, help="seed of the choice pairs and of the generated images")


@dataclass
class Session:
    """One visitor's progress (a Gradio State): the choices made so far."""

    round: int = 0
    chosen: list = dataclass_field(default_factory=list)
    rejected: list = dataclass_field(default_factory=list)
    user: Any = None


class DemoBackend:
    """Everything the app does, without Gradio (tested directly and through the app)."""

    def __init__(self, config: DemoConfig) -> None:
        from .models import ModelLoadError, load_generator
        from .personal import Personaliser, load_encoder
        from .sample import resolve_device

        if config.rounds < 4:
            raise ConfigError(f"rounds must be at least 4 (a user embedding needs 4 choices), got {config.rounds}")
        self.config = config
        device = resolve_device(config.device)
        path = Path(config.model)
        if not path.exists():
            raise ModelLoadError(f"model {config.model!r} does not exist: give model=PATH to a diffusers folder "
                                 "(with model_index.json) or a single .safetensors file")
        try:
            generator = load_generator(config.model, device=device, config=config.single_file_config)
        except ModelLoadError:
            raise
        except Exception as error:  # a folder diffusers cannot read: say which and why, not a traceback
            raise ModelLoadError(f"cannot load model {config.model!r}: {type(error).__name__}: {error}") from error
        ppd = config.ppd
        if ppd is None and path.resolve() == TESTBED_MODEL and TESTBED_PPD.is_file():
            ppd = str(TESTBED_PPD)
        if ppd is not None and generator.denoiser_name != "unet":
            logger.warning("PPD needs a UNet model; %s is %s: offering the steering route only", config.model, generator.family)
            ppd = None
        self.personaliser = Personaliser(generator, load_encoder(config.encoder, config.pretrained, device),
                                         ppd=ppd, particles=config.particles)
        self.pairs = self._make_pairs()

    @property
    def routes(self) -> tuple[str, ...]:
        return self.personaliser.routes

    @torch.no_grad()
    def _make_pairs(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """For each round, the two most different of 4 base samples of a prompt (in the encoder's space)."""
        prompts = [CHOICE_PROMPTS[i % len(CHOICE_PROMPTS)] for i in range(self.config.rounds)]
        generator = self.personaliser.generator
        rng = torch.Generator(device=generator.device).manual_seed(self.config.seed)
        images = generator.sample(prompts, num_images_per_prompt=4, num_inference_steps=self.config.steps,
                                  guidance_scale=self.config.guidance_scale, generator=rng).images.cpu()
        pairs = []
        for index, prompt in enumerate(prompts):
            group = images[4 * index : 4 * index + 4]
            embeddings = self.personaliser.encoder.embed_images(group.to(generator.device)).cpu()
            distance = torch.cdist(embeddings, embeddings)
            first, second = divmod(int(distance.argmax()), 4)
            pairs.append((prompt, group[first], group[second]))
        return pairs

    def show(self, image: torch.Tensor):
        from PIL import Image

        from .models.base import to_pil

        size = self.config.display_size
        return to_pil(image[None])[0].resize((size, size), Image.NEAREST)

    def pair_view(self, session: Session) -> tuple[Any, Any, str]:
        if session.round >= self.config.rounds:
            return None, None, (f"Done: your taste was learned from {self.config.rounds} choices. "
                                "Type a prompt below.")
        prompt, left, right = self.pairs[session.round]
        return self.show(left), self.show(right), (f"Round {session.round + 1} of {self.config.rounds}: "
                                                   f"which image of \u201c{prompt}\u201d do you prefer?")

    def choose(self, session: Session, side: str) -> Session:
        """Record a choice (``"left"`` or ``"right"``); after the last round, embed the user."""
        from .personal import embed_user

        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        if session.round >= self.config.rounds:
            return session
        _, left, right = self.pairs[session.round]
        chosen, rejected = (left, right) if side == "left" else (right, left)
        session = Session(session.round + 1, session.chosen + [chosen], session.rejected + [rejected])
        if session.round == self.config.rounds:
            session.user = embed_user(self.personaliser.encoder, torch.stack(session.chosen), torch.stack(session.rejected))
        return session

    def generate(self, session: Session, prompt: str, route: str, strength: float) -> list:
        if session.user is None:
            raise ValueError(f"make your {self.config.rounds} choices first")
        if not prompt.strip():
            raise ValueError("type a prompt first")
        if route not in self.routes:
            raise ValueError(f"route {route!r} is not available here (available: {', '.join(self.routes)})")
        images = self.personaliser.generate(
            [prompt.strip()], session.user, route=route, strength=float(strength),
            num_images_per_prompt=self.config.num_images, seed=self.config.seed,
            num_inference_steps=self.config.steps, guidance_scale=self.config.guidance_scale,
        )
        return [self.show(image) for image in images.cpu()]


def build_app(backend: DemoBackend):
    """The Gradio Blocks app (API names ``choose_left``, ``choose_right``, ``generate``, ``pair``)."""
    import gradio as gr

    route_labels = [label for label, route in ROUTE_LABELS.items() if route in backend.routes]

    def start():
        session = Session()
        return (session, *backend.pair_view(session))

    def chooser(side):
        def choose(session):
            session = backend.choose(session or Session(), side)
            return (session, *backend.pair_view(session))
        return choose

    def generate(session, prompt, route_label, strength):
        try:
            return backend.generate(session or Session(), prompt, ROUTE_LABELS.get(route_label, route_label), strength)
        except ValueError as error:
            raise gr.Error(str(error)) from None

    with gr.Blocks(title="visalign: personalised generation") as app:
        gr.Markdown("## Personalised generation\nClick the image you prefer in each pair. After "
                    f"{backend.config.rounds} choices, type any prompt and get images for your taste.")
        session = gr.State(Session())
        status = gr.Markdown(elem_id="round-status")
        with gr.Row():
            left = gr.Image(label="left", interactive=False, elem_id="left-image", height=backend.config.display_size)
            right = gr.Image(label="right", interactive=False, elem_id="right-image", height=backend.config.display_size)
        with gr.Row():
            left_button = gr.Button("I prefer the left one", elem_id="choose-left")
            right_button = gr.Button("I prefer the right one", elem_id="choose-right")
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", value="", placeholder="e.g. a red circle", elem_id="prompt")
            route = gr.Radio(route_labels, value=route_labels[0], label="Route", elem_id="route")
            strength = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="base \u2194 personal", elem_id="strength")
        generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
        gallery = gr.Gallery(label="For your taste", columns=backend.config.num_images, elem_id="gallery",
                             height=backend.config.display_size + 80, object_fit="contain")

        outputs = [session, left, right, status]
        app.load(start, None, outputs, api_name="pair")
        left_button.click(chooser("left"), [session], outputs, api_name="choose_left", concurrency_limit=1)
        right_button.click(chooser("right"), [session], outputs, api_name="choose_right", concurrency_limit=1)
        generate_button.click(generate, [session, prompt, route, strength], gallery, api_name="generate",
                              concurrency_limit=1)
    app.queue(default_concurrency_limit=1)
    return app


def run_demo(config: DemoConfig, block: bool = True):
    """Build the backend and app and launch it on ``config.host:config.port``."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ConfigError("the demo needs Gradio: pip install 'visalign[demo]'") from None
    app = build_app(DemoBackend(config))
    if config.host not in ("127.0.0.1", "localhost"):
        logger.warning("the demo binds to %s: anyone who can reach this address can use it", config.host)
    app.launch(server_name=config.host, server_port=config.port, prevent_thread_lock=not block, show_error=True)
    return app
