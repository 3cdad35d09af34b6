"""One trial, opened from the Pareto chart, the trial table or the trial picker."""

from __future__ import annotations

from typing import Any

import pandas as pd
import sqlalchemy as sa
import streamlit as st

from spectune.dashboard import data
from spectune.dashboard.figures import (
    category_table, ci_text, config_label, exit_layer_figure, lossless_text, position_acceptance_figure,
)
from spectune.store import StoreError

STATUS_BADGES = {"done": ("done", "green"), "running": ("running", "blue"),
                 "pending": ("pending", "gray"), "error": ("error", "red")}


def _metric_tiles(metrics: dict[str, Any]) -> None:
    tiles = (("speedup", "speedup", "{:.2f}x"), ("mean_accepted_tokens", "tau", "{:.2f}"),
             ("acceptance_rate", "acceptance", "{:.0%}"),
             ("tree_tokens_per_step", "tree tok/step", "{:.1f}"),
             ("draft_share", "draft share", "{:.0%}"), ("tokens_per_s", "tok/s", "{:.0f}"))
    if metrics.get("p95_latency_s") is not None:  # a served engine (vLLM): latencies instead of tree costs
        tiles = tiles[:3] + (("p95_latency_s", "p95 latency", "{:.2f} s"), ("ttft_s", "TTFT", "{:.3f} s"), tiles[5])
    columns = st.columns(3) + st.columns(3)
    for column, (key, label, fmt) in zip(columns, tiles):
        value = metrics.get(key)
        ci = ci_text(metrics) if key == "speedup" else ""
        column.metric(label, "–" if value is None else fmt.format(value),
                      help=f"95% bootstrap interval over prompts: {ci}" if ci else None)
        if ci:
            column.caption(f"95% CI {ci}")


def _lossless_line(metrics: dict[str, Any], n_prompts: int) -> None:
    verdict = lossless_text(metrics)
    if verdict == "yes":
        st.success(f"Lossless: greedy outputs equal plain decoding on all {n_prompts} prompts.",
                   icon=":material/verified:")
    elif verdict.startswith("yes, within tolerance"):
        share = metrics.get("exact_match_rate")
        same = "" if share is None else f"{float(share):.0%} of the greedy outputs equal plain decoding; "
        st.success(f"Lossless within tolerance: {same}every other token is the target's argmax within its "
                   f"dtype's rounding (certificate {verdict.removeprefix('yes, within tolerance').strip(' ()')}).",
                   icon=":material/verified:")
    elif verdict == "lossy method":
        st.warning("Lossy by design: outputs may differ from plain decoding; kept off the front.",
                   icon=":material/warning:")
    elif verdict.startswith("NO"):
        st.error(f"Not lossless: {verdict.removeprefix('NO ').strip('()') or 'outputs differ'} "
                 "from plain decoding; kept off the front.", icon=":material/error:")
    else:
        st.info("Unchecked: sampling at temperature > 0 is lossless by the method's rule, but its outputs "
                "are not compared with AR; kept off the front unless 'Count unchecked' is on.")


def _hardware_line(hardware: dict[str, Any] | None) -> str:
    if not hardware:
        return "hardware: not recorded"
    parts = [hardware.get("device"), hardware.get("gpu_model") or hardware.get("cpu_model"),
             f"{hardware['n_cpus']} CPUs" if hardware.get("n_cpus") else None,
             hardware.get("hostname") and f"host {hardware['hostname']}",
             hardware.get("torch_version") and f"torch {hardware['torch_version']}"]
    return "hardware: " + " · ".join(str(p) for p in parts if p)


def _serve_button(url: str, detail: dict[str, Any]) -> None:
    trial_id = detail["trial_id"]
    if detail["served"]:
        st.info("The live endpoint serves this configuration.", icon=":material/podcasts:")
        return
    done = detail["status"] == "done"
    clicked = st.button("Serve this configuration", key=f"serve_{trial_id}", type="primary",
                        disabled=not done, icon=":material/rocket_launch:",
                        help="Mark this trial as the configuration the live endpoint serves"
                        if done else "Only finished trials can be served")
    if clicked:
        try:
            data.serve_trial(url, trial_id)
        except (StoreError, ValueError, sa.exc.SQLAlchemyError) as exc:
            st.error(f"Could not mark trial {trial_id} as served: {exc}")
            return
        st.toast(f"Trial {trial_id} is now the served configuration.")
        st.success(f"Trial {trial_id} is now the configuration the endpoint serves "
                   "(`spectune serve` picks it up on start).", icon=":material/podcasts:")


def _per_prompt_table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        st.caption("No per-prompt results recorded.")
        return
    frame = pd.DataFrame(rows)
    st.dataframe(frame, hide_index=True, width="stretch", column_config={
        "mean_accepted_tokens": st.column_config.NumberColumn("tau", format="%.2f"),
        "wall_s": st.column_config.NumberColumn("wall s", format="%.3f"),
        "matches_ar": st.column_config.CheckboxColumn("matches AR"),
    })


def render_trial(url: str, trial_id: int, colors: dict[str, str] | None = None) -> None:
    """Config, metrics, lossless status, hardware, acceptance curves, per-prompt rows and
    the serve button of one trial; ``colors`` maps methods to the charts' colours."""
    detail = data.trial_detail(url, trial_id)
    metrics = detail["metrics"] or {}
    label = config_label(detail["config"], detail["knobs"].get("method"), metrics)
    badge, color = STATUS_BADGES.get(detail["status"], (detail["status"], "gray"))
    st.markdown(f"**Trial {trial_id}** :{color}-badge[{badge}]  \n`{label}`")
    st.caption(_hardware_line(detail["hardware"]))
    if detail["error"]:
        st.error(f"Trial failed: {detail['error']}", icon=":material/error:")
    if not metrics:
        st.caption(f"No results yet (status: {detail['status']}).")
        return
    _metric_tiles(metrics)
    _lossless_line(metrics, metrics.get("n_prompts") or len(detail["per_prompt"]))
    _serve_button(url, detail)
    if metrics.get("by_category"):
        st.markdown("**By prompt category**")
        st.dataframe(category_table(metrics["by_category"]), hide_index=True, width="stretch", column_config={
            "speedup": st.column_config.NumberColumn(format="%.2fx"),
            "mean_accepted_tokens": st.column_config.NumberColumn("tau", format="%.2f"),
            "acceptance_rate": st.column_config.NumberColumn("acceptance", format="%.2f")})
    if metrics.get("acceptance_by_position"):
        st.markdown("**Per-position acceptance**")
        one = pd.DataFrame([{"trial_id": trial_id, "config": detail["config"],
                             "method": metrics.get("method"), "extra": metrics,
                             "acceptance_by_position": metrics["acceptance_by_position"]}])
        figure = position_acceptance_figure(one, colors).update_layout(showlegend=False,
                                                                       height=240)
        st.plotly_chart(figure,
                        key=f"detail_positions_{trial_id}", config={"displayModeBar": False})
    if metrics.get("acceptance_by_exit_layer"):
        st.markdown("**Acceptance per exit layer**")
        st.plotly_chart(exit_layer_figure(metrics["acceptance_by_exit_layer"]),
                        key=f"detail_exit_{trial_id}", config={"displayModeBar": False})
    with st.expander("Configuration"):
        st.json(detail["config"])
    with st.expander(f"Per-prompt results ({len(detail['per_prompt'])})"):
        _per_prompt_table(detail["per_prompt"])
    with st.expander("Hardware"):
        st.json(detail["hardware"] or {})


__all__ = ["render_trial"]
