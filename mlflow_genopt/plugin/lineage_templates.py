"""HTML of the lineage pages: Jinja2 templates (autoescaped) kept in Python, so that the pages
need no package data, no build step and no JavaScript bundle. The little script there is only
submits a form when a select changes; every page works without it."""

from __future__ import annotations

import jinja2

from ..tracking import layout

_BASE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{% block title %}genopt lineage{% endblock %}</title>
<style>
:root { --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --bg:#f6f8fa; --accent:#0b5fff;
        --ok:#1a7f37; --bad:#cf222e; --warn:#9a6700; --gold:#bf8700; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Helvetica,Arial,sans-serif; color:var(--fg); }
header.top { display:flex; gap:16px; align-items:center; padding:10px 20px; background:#11171c; color:#fff; }
header.top a { color:#fff; text-decoration:none; }
header.top .brand { font-weight:600; }
header.top .spacer { flex:1; }
main { padding:16px 20px 40px; max-width:1600px; margin:0 auto; }
h1 { font-size:20px; margin:4px 0 6px; }
h2 { font-size:15px; margin:18px 0 8px; }
h3 { font-size:14px; margin:14px 0 6px; }
a { color:var(--accent); }
.muted { color:var(--muted); }
.facts { display:flex; flex-wrap:wrap; gap:6px 18px; margin:6px 0 4px; color:var(--muted); }
.facts b { color:var(--fg); font-weight:600; }
.layout { display:grid; grid-template-columns:minmax(320px, 420px) minmax(0, 1fr); gap:20px; align-items:start; }
@media (max-width: 900px) { .layout { grid-template-columns: 1fr; } }
.panel { border:1px solid var(--line); border-radius:8px; padding:12px 14px; background:#fff; }
.panel > h2:first-child { margin-top:0; }
table { border-collapse:collapse; width:100%; }
th, td { text-align:left; padding:4px 8px; border-bottom:1px solid var(--line); vertical-align:top; }
th { font-weight:600; color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.02em; }
th a { text-transform:none; }
td.num, th.num { text-align:right; font-variant-numeric: tabular-nums; }
tr.focus td { background:#eef4ff; }
td code { white-space:nowrap; }
.badge { display:inline-block; padding:0 7px; border-radius:10px; font-size:12px; line-height:18px; border:1px solid transparent; }
.badge.initial { background:#eaeef2; color:#424a53; }
.badge.accepted { background:#dafbe1; color:var(--ok); border-color:#aceebb; }
.badge.rejected { background:#ffebe9; color:var(--bad); border-color:#ffcecb; }
.badge.invalid { background:#fff8c5; color:var(--warn); border-color:#f5e0a0; }
.star { color:var(--gold); font-weight:600; }
ul.tree, ul.tree ul { list-style:none; margin:0; padding-left:18px; }
ul.tree { padding-left:0; }
ul.tree ul { border-left:1px dashed var(--line); margin-left:8px; }
ul.tree li { margin:3px 0; }
a.node { display:block; padding:5px 8px; border:1px solid var(--line); border-radius:6px; text-decoration:none; color:var(--fg); background:#fff; }
a.node:hover { border-color:var(--accent); }
a.node.current { border-color:var(--accent); box-shadow:0 0 0 2px #b6cfff; background:#f3f7ff; }
a.node.rejected { opacity:.85; }
a.node .vid { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-weight:600; }
a.node .scores { display:block; color:var(--muted); font-size:12px; }
pre, code { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:12.5px; }
pre { background:var(--bg); border:1px solid var(--line); border-radius:6px; padding:8px 10px; overflow:auto; max-height:36em; white-space:pre-wrap; word-break:break-word; margin:4px 0 10px; }
pre.diff { white-space:pre; padding:0; }
pre.diff span { display:block; padding:0 10px; }
pre.diff .add { background:#dafbe1; }
pre.diff .del { background:#ffebe9; }
pre.diff .hunk { background:#ddf4ff; color:#0550ae; }
pre.diff .file { font-weight:600; background:#eaeef2; }
.reasoning { border-left:3px solid var(--accent); background:#f3f7ff; padding:8px 12px; margin:6px 0 10px; white-space:pre-wrap; }
.invalid-reason { border-left:3px solid var(--warn); background:#fff8c5; padding:8px 12px; margin:6px 0 10px; }
details { margin:4px 0; }
details > summary { cursor:pointer; font-weight:600; }
.message-role { font-size:12px; text-transform:uppercase; color:var(--muted); letter-spacing:.03em; }
form.inline { display:flex; gap:8px; align-items:center; flex-wrap:wrap; margin:6px 0; }
select, button { font:inherit; padding:3px 6px; }
.empty { color:var(--muted); font-style:italic; }
.error { border:1px solid #ffcecb; background:#ffebe9; padding:10px 14px; border-radius:8px; }
</style>
</head>
<body>
<header class="top">
  <a class="brand" href="{{ url_for('genopt.index') }}">genopt lineage</a>
  <a href="{{ mlflow_ui }}">MLflow UI</a>
  <span class="spacer"></span>
  <span class="muted">mlflow-genopt {{ library_version }}</span>
</header>
<main>
{% block main %}{% endblock %}
</main>
</body>
</html>
"""

_MACROS = r"""
{% macro badge(status) -%}<span class="badge {{ status }}">{{ status }}</span>{%- endmacro %}

{% macro tree(nodes, focus_id, run_id) -%}
<ul class="tree">
{% for n in nodes %}
  <li>
    <a class="node {{ n.status }}{% if n.version_id == focus_id %} current{% endif %}"
       href="{{ url_for('genopt.loop_page', run_id=run_id, version=n.version_id) }}"
       data-version="{{ n.version_id }}">
      <span class="vid">{{ n.version_id }}</span> {{ badge(n.status) }}
      {% if n.selected %}<span class="star" title="selected version">&#9733; selected</span>{% endif %}
      <span class="scores">step {{ n.step }} &middot; val {{ n.val_score|score }} &middot; batch {{ n.batch_score|score }}{% if n.test_score is not none %} &middot; test {{ n.test_score|score }}{% endif %}</span>
    </a>
    {% if n.children %}{{ tree(n.children, focus_id, run_id) }}{% endif %}
  </li>
{% endfor %}
</ul>
{%- endmacro %}

{% macro diff_block(text) -%}
{% if text is none %}<p class="empty">The values of one of the versions could not be read.</p>
{% elif not text %}<p class="empty">No difference: both versions have the same values.</p>
{% else %}<pre class="diff" data-testid="diff">{% for cls, line in text|diff_lines %}<span class="{{ cls }}">{{ line }}</span>{% endfor %}</pre>{% endif %}
{%- endmacro %}

{% macro context_block(messages) -%}
{% if messages %}
  {% for m in messages %}
  <details {% if loop.last %}open{% endif %}>
    <summary><span class="message-role">{{ m.role }}</span> &middot; {{ m.content|length }} characters</summary>
    <pre data-testid="context-message">{{ m.content }}</pre>
  </details>
  {% endfor %}
{% else %}<p class="empty">No learning context was recorded for this step.</p>{% endif %}
{%- endmacro %}

{% macro trials_table(rows) -%}
<table>
  <tr><th>example</th><th class="num">score</th><th>feedback</th></tr>
  {% for t in rows %}
  <tr><td><code>{{ t.example_id }}</code></td><td class="num">{{ t.score|score }}</td><td>{{ t.feedback|truncate(300) }}</td></tr>
  {% endfor %}
</table>
{%- endmacro %}
"""

_INDEX = r"""{% extends "base.html" %}
{% block main %}
<h1>Learning loops</h1>
<p class="muted">Every run logged by an mlflow-genopt learning loop in this tracking server, newest first.
Open one to see its tree of artifact versions, or pick two to compare their best versions.</p>
{% if runs %}
<form class="inline" action="{{ url_for('genopt.compare') }}" method="get">
  <label>Compare <select name="a">{% for r in runs %}<option value="{{ r.info.run_id }}" {% if loop.index == 1 %}selected{% endif %}>{{ r.info.run_name }} ({{ r.info.run_id[:8] }})</option>{% endfor %}</select></label>
  <label>with <select name="b">{% for r in runs %}<option value="{{ r.info.run_id }}" {% if loop.index == 2 %}selected{% endif %}>{{ r.info.run_name }} ({{ r.info.run_id[:8] }})</option>{% endfor %}</select></label>
  <button type="submit">Compare best versions</button>
</form>
<table data-testid="loop-runs">
  <tr><th>run</th><th>experiment</th><th>project / task</th><th>starting artifact</th>
      <th class="num">batch</th><th class="num">steps</th><th class="num">best val</th><th class="num">test</th>
      <th>selected</th><th>status</th><th>started</th><th></th></tr>
  {% for r in runs %}
  {% set t = r.data.tags %}{% set p = r.data.params %}
  <tr>
    <td><a href="{{ url_for('genopt.loop_page', run_id=r.info.run_id) }}">{{ r.info.run_name or r.info.run_id }}</a>
        {% if t.get(layout.TAG_STUDY) %}<div class="muted">study {{ t[layout.TAG_STUDY] }}</div>{% endif %}</td>
    <td>{{ experiments.get(r.info.experiment_id, r.info.experiment_id) }}</td>
    <td>{{ t.get(layout.TAG_TASK, p.get('task', '')) }}</td>
    <td>{{ t.get(layout.TAG_INIT, p.get('init', '')) }}</td>
    <td class="num">{{ p.get('batch_size', '') }}</td>
    <td class="num">{{ p.get('steps', '') }}</td>
    <td class="num">{{ r.data.metrics.get(layout.METRIC_BEST_VAL_SCORE)|score }}</td>
    <td class="num">{{ r.data.metrics.get(layout.METRIC_TEST_SCORE)|score }}</td>
    <td><code>{{ t.get(layout.TAG_SELECTED_VERSION, '') }}</code></td>
    <td>{{ r.info.status }}</td>
    <td class="muted">{{ r.info.start_time|when }}</td>
    <td><a href="{{ mlflow_run_url(r) }}" title="the run in the MLflow UI">MLflow&nbsp;&#8599;</a></td>
  </tr>
  {% endfor %}
</table>
{% else %}
<p class="empty">No learning loops in this tracking server yet. Run one, e.g.
<code>genopt run bbeh</code> with <code>MLFLOW_TRACKING_URI</code> pointing here, then reload.</p>
{% endif %}
{% endblock %}
"""

_LOOP = r"""{% extends "base.html" %}
{% from "macros.html" import tree, badge, diff_block, context_block, trials_table %}
{% block title %}{{ view.name }} · genopt lineage{% endblock %}
{% block main %}
{% set t = view.tags %}{% set p = view.params %}
<div class="muted"><a href="{{ url_for('genopt.index') }}">Learning loops</a> &rsaquo; {{ view.experiment_name }}</div>
<h1>{{ view.name }}</h1>
<div class="facts">
  <span>project <b>{{ t.get(layout.TAG_PROJECT, p.get('project', '?')) }}</b></span>
  <span>task <b>{{ t.get(layout.TAG_TASK, p.get('task', '?')) }}</b></span>
  <span>starting artifact <b>{{ t.get(layout.TAG_INIT, p.get('init', '?')) }}</b></span>
  {% for key in key_params if key in p %}<span>{{ key }} <b>{{ p[key] }}</b></span>{% endfor %}
</div>
<div class="facts">
  <span>status <b>{{ view.run.info.status }}</b></span>
  {% if t.get(layout.TAG_STOP_REASON) %}<span>stop reason <b>{{ t[layout.TAG_STOP_REASON] }}</b></span>{% endif %}
  <span>best val <b>{{ view.metrics.get(layout.METRIC_BEST_VAL_SCORE)|score }}</b></span>
  <span>test <b>{{ view.metrics.get(layout.METRIC_TEST_SCORE)|score }}</b></span>
  {% if view.selected %}<span>selected <a href="{{ url_for('genopt.loop_page', run_id=view.run_id, version=view.selected.version_id) }}"><code>{{ view.selected.version_id }}</code></a></span>{% endif %}
  {% for uri in prompts %}<span>prompt <code>{{ uri }}</code></span>{% endfor %}
  <span><a href="{{ mlflow_run_url(view.run) }}" data-testid="mlflow-run-link">Open the run in MLflow &#8599;</a></span>
</div>
{% if other_runs %}
<form class="inline" action="{{ url_for('genopt.compare') }}" method="get">
  <input type="hidden" name="a" value="{{ view.run_id }}">
  <label>Compare best version with <select name="b" onchange="this.form.submit()">
    <option value="">another loop run&hellip;</option>
    {% for r in other_runs %}<option value="{{ r.info.run_id }}">{{ r.info.run_name }} ({{ r.info.run_id[:8] }})</option>{% endfor %}
  </select></label>
  <noscript><button type="submit">Compare</button></noscript>
</form>
{% endif %}

<div class="layout">
  <div>
    <section class="panel" data-testid="version-tree">
      <h2>Artifact versions</h2>
      {% if view.roots %}{{ tree(view.roots, focus_id, view.run_id) }}
      {% else %}<p class="empty">No versions recorded yet.</p>{% endif %}
      <p class="muted">Children of a version are the candidates proposed from it: accepted ones became the current version, rejected ones did not.</p>
    </section>
    <section class="panel" style="margin-top:14px">
      <h2>Steps</h2>
      {% if view.steps %}
      <table data-testid="steps">
        <tr><th class="num">step</th><th>decision</th>
            <th class="num" title="score of the current version on the step's batch">batch</th>
            <th class="num" title="score of the candidate on the same batch">cand.</th>
            <th class="num" title="validation score of the candidate, when it was accepted">val</th>
            <th class="num" title="best validation score so far">best</th></tr>
        {% for s in view.steps %}
        <tr class="{% if focus_step == s.step %}focus{% endif %}">
          <td class="num"><a href="{{ url_for('genopt.loop_page', run_id=view.run_id, step=s.step) }}">{{ s.step }}</a></td>
          <td>{{ badge(s.decision) }}{% if s.candidate_id %} <a href="{{ url_for('genopt.loop_page', run_id=view.run_id, version=s.candidate_id) }}"><code>{{ s.candidate_id }}</code></a>{% endif %}</td>
          <td class="num">{{ s.batch_score|score }}</td>
          <td class="num">{{ s.candidate_batch_score|score }}</td>
          <td class="num">{{ s.val_score|score }}</td>
          <td class="num">{{ s.best_val_score|score }}</td>
        </tr>
        {% endfor %}
      </table>
      <p class="muted">batch: the current version on the step's batch of trials; cand.: the
        candidate on the same batch; val: the candidate on the validation split (accepted ones);
        best: the best validation score so far. Click a step for what the optimizer saw.</p>
      {% else %}<p class="empty">No steps recorded yet.</p>{% endif %}
    </section>
  </div>

  <section class="panel" data-testid="detail">
  {% if version %}
    <h2>Version <code data-testid="detail-version">{{ version.version_id }}</code> {{ badge(version.status) }}
      {% if version.selected %}<span class="star">&#9733; selected</span>{% endif %}</h2>
    <div class="facts">
      <span>step <b>{{ version.step }}</b></span>
      <span>parent {% if version.parent_id %}<a href="{{ url_for('genopt.loop_page', run_id=view.run_id, version=version.parent_id) }}"><code>{{ version.parent_id }}</code></a>{% else %}<b>none (starting version)</b>{% endif %}</span>
      <span>val <b>{{ version.val_score|score }}</b></span>
      <span>candidate batch <b>{{ version.batch_score|score }}</b></span>
      {% if version.test_score is not none %}<span>test <b>{{ version.test_score|score }}</b></span>{% endif %}
      {% if version.model_id %}<span><a href="{{ mlflow_model_url(view.run, version.model_id) }}">LoggedModel in MLflow &#8599;</a></span>{% endif %}
    </div>

    <h3>Diff</h3>
    <form class="inline" method="get" action="{{ url_for('genopt.loop_page', run_id=view.run_id) }}">
      <input type="hidden" name="version" value="{{ version.version_id }}">
      <label>against <select name="against" data-testid="against" onchange="this.form.submit()">
        {% for v in view.versions if v.version_id != version.version_id %}
        <option value="{{ v.version_id }}" {% if v.version_id == against %}selected{% endif %}>{{ v.version_id }} ({{ v.status }}{% if v.version_id == version.parent_id %}, parent{% endif %})</option>
        {% endfor %}
      </select></label>
      <noscript><button type="submit">Show diff</button></noscript>
    </form>
    {% if against %}
      <div class="muted">from <code>{{ against }}</code> to <code>{{ version.version_id }}</code></div>
      {{ diff_block(diff_text) }}
    {% else %}<p class="empty">The starting version has no parent; pick another version to diff against.</p>{% endif %}

    {% if version.step > 0 %}
      <h3>Optimizer's reasoning</h3>
      {% if reasoning %}<div class="reasoning" data-testid="reasoning">{{ reasoning }}</div>
      {% else %}<p class="empty">The optimizer gave no reasoning.</p>{% endif %}
      <h3>Learning context that produced it (step {{ version.step }})</h3>
      <div data-testid="context">{{ context_block(evidence.context) }}</div>
      <details><summary>Raw optimizer response</summary><pre>{{ evidence.response or '' }}</pre></details>
      {% if evidence.candidate_trials %}
      <details><summary>Its trials on the step's batch ({{ evidence.candidate_trials|length }})</summary>{{ trials_table(evidence.candidate_trials) }}</details>
      {% endif %}
    {% endif %}

    <h3>Values</h3>
    {% if values %}
      {% for name, text in values.items() %}
      <details {% if loop.first %}open{% endif %}><summary><code>{{ name }}</code></summary><pre>{{ text }}</pre></details>
      {% endfor %}
    {% else %}<p class="empty">The values of this version could not be read.</p>{% endif %}

  {% elif step_row %}
    <h2>Step {{ step_row.step }} {{ badge(step_row.decision) }}</h2>
    <div class="facts">
      <span>current batch score <b>{{ step_row.batch_score|score }}</b></span>
      <span>candidate <b>{{ step_row.candidate_batch_score|score }}</b></span>
      <span>best val <b>{{ step_row.best_val_score|score }}</b></span>
      {% if step_row.candidate_id %}<span>candidate <a href="{{ url_for('genopt.loop_page', run_id=view.run_id, version=step_row.candidate_id) }}"><code>{{ step_row.candidate_id }}</code></a></span>{% endif %}
    </div>
    {% set proposal = evidence.proposal or {} %}
    {% if proposal.get('invalid_reason') %}<h3>Why the proposal was invalid</h3><div class="invalid-reason" data-testid="invalid-reason">{{ proposal['invalid_reason'] }}</div>{% endif %}
    {% if proposal.get('note') %}<p class="muted">{{ proposal['note'] }}</p>{% endif %}
    <h3>Optimizer's reasoning</h3>
    {% if proposal.get('reasoning') %}<div class="reasoning">{{ proposal['reasoning'] }}</div>{% else %}<p class="empty">None recorded.</p>{% endif %}
    <h3>Learning context</h3>
    <div data-testid="context">{{ context_block(evidence.context) }}</div>
    <details open><summary>Raw optimizer response</summary><pre>{{ evidence.response or '' }}</pre></details>
    {% if evidence.trials %}<h3>Trials of the current version on this step's batch</h3>{{ trials_table(evidence.trials) }}{% endif %}
  {% else %}
    <p class="empty">Click a version in the tree or a step to see what produced it.</p>
  {% endif %}
  </section>
</div>
{% endblock %}
"""

_COMPARE = r"""{% extends "base.html" %}
{% from "macros.html" import diff_block, badge %}
{% block title %}Compare · genopt lineage{% endblock %}
{% block main %}
<div class="muted"><a href="{{ url_for('genopt.index') }}">Learning loops</a> &rsaquo; compare</div>
<h1>Best versions of two learning loops</h1>
<table data-testid="compare">
  <tr><th></th>{% for v in views %}<th><a href="{{ url_for('genopt.loop_page', run_id=v.run_id) }}">{{ v.name }}</a> <a href="{{ mlflow_run_url(v.run) }}" title="the run in the MLflow UI">&#8599;</a></th>{% endfor %}</tr>
  <tr><td>task</td>{% for v in views %}<td>{{ v.tags.get(layout.TAG_TASK, '') }}</td>{% endfor %}</tr>
  <tr><td>selected version</td>{% for v in views %}<td>{% if v.selected %}<a href="{{ url_for('genopt.loop_page', run_id=v.run_id, version=v.selected.version_id) }}"><code>{{ v.selected.version_id }}</code></a>{% else %}&ndash;{% endif %}</td>{% endfor %}</tr>
  <tr><td>best val score</td>{% for v in views %}<td>{{ v.metrics.get(layout.METRIC_BEST_VAL_SCORE)|score }}</td>{% endfor %}</tr>
  <tr><td>test score</td>{% for v in views %}<td>{{ v.metrics.get(layout.METRIC_TEST_SCORE)|score }}</td>{% endfor %}</tr>
  <tr><td>versions (accepted / rejected)</td>{% for v in views %}<td>{{ v.versions|length }} ({{ v.versions|selectattr('status', 'equalto', 'accepted')|list|length }} / {{ v.versions|selectattr('status', 'equalto', 'rejected')|list|length }})</td>{% endfor %}</tr>
  <tr><td>total tokens</td>{% for v in views %}<td>{{ (v.metrics.get(layout.totals_metric('prompt_tokens'), 0) + v.metrics.get(layout.totals_metric('completion_tokens'), 0))|int }}</td>{% endfor %}</tr>
</table>
<h2>Loop config differences</h2>
{% if param_diff %}
<table>
  <tr><th>parameter</th>{% for v in views %}<th>{{ v.name }}</th>{% endfor %}</tr>
  {% for key, left, right in param_diff %}<tr><td><code>{{ key }}</code></td><td>{{ left }}</td><td>{{ right }}</td></tr>{% endfor %}
</table>
{% else %}<p class="empty">Same loop config.</p>{% endif %}
<h2>Diff of the best versions</h2>
{% if views[0].selected and views[1].selected %}
<div class="muted">from <code>{{ views[0].selected.version_id }}</code> ({{ views[0].name }}) to <code>{{ views[1].selected.version_id }}</code> ({{ views[1].name }})</div>
{{ diff_block(diff_text) }}
{% else %}<p class="empty">A run has no selected version yet (it may still be running).</p>{% endif %}
{% endblock %}
"""

_ERROR = r"""{% extends "base.html" %}
{% block main %}<div class="error"><b>{{ title }}</b><p>{{ message }}</p>
<p><a href="{{ url_for('genopt.index') }}">All learning loops</a></p></div>{% endblock %}
"""

TEMPLATES = {
    "base.html": _BASE,
    "macros.html": _MACROS,
    "index.html": _INDEX,
    "loop.html": _LOOP,
    "compare.html": _COMPARE,
    "error.html": _ERROR,
}


def environment() -> jinja2.Environment:
    """The templates above with autoescaping on (all text shown comes from the store); they read
    tag and metric names from the global ``layout`` (:mod:`mlflow_genopt.tracking.layout`)."""
    env = jinja2.Environment(
        loader=jinja2.DictLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.ChainableUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["layout"] = layout
    return env
