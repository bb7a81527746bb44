"""``celery --app worker.celery_main ...`` (Flower, celery inspect): the adapter's Celery app as a module attribute.

Building the app imports no model code; workers are started with ``fhir-ner worker`` instead.
"""

from core.celery_app import get_celery_app

app = get_celery_app()
