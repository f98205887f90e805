"""The platform's managers: tasks (pure compute), models, jobs (the task manager), cluster and
ops (the scheduler side); :mod:`bitinglip.platform.connect` assembles them."""
