"""The user's tasks: the README's one-line install, and a rollup into the user's own table."""

import settings
from celery import Celery
from openai import OpenAI
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

import tokenmeter
from models import Report

app = Celery("userapp")
app.config_from_object("celeryconfig")
tokenmeter.install(app)

engine = create_engine(settings.DATABASE_URL)


@app.task(name="userapp.write_report")
def write_report(report_id: int) -> None:
    with Session(engine) as session, session.begin():
        session.add(Report(id=report_id, title=f"report {report_id}"))
    client = OpenAI(max_retries=0)
    with tokenmeter.usage_scope("report", report_id) as scope:
        scope.bind_rollup(
            tokenmeter.TableRollup(
                Report,
                key={"id": report_id},
                sums={"tokens_in": "input_tokens", "tokens_out": "output_tokens"},
                cost_column="cost_usd",
            )
        )
        for part in ("outline", "draft"):
            client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": f"{part} of report {report_id}"}],
            )
