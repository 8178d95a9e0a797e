// Niceties only: every form works without this file.
"use strict";

// A second click on a submit button while its form is being sent does nothing (the server refuses a repeat anyway).
document.addEventListener("submit", (event) => {
  const form = event.target;
  if (form.dataset.sent) { event.preventDefault(); return; }
  form.dataset.sent = "1";
  for (const button of form.querySelectorAll("button[type=submit]")) {
    button.disabled = true;
    if (button.dataset.busy) button.textContent = button.dataset.busy;
  }
});

// The pipeline page refreshes itself every few seconds.
const pipeline = document.getElementById("pipeline");
if (pipeline) {
  const stamp = document.getElementById("refreshed");
  setInterval(async () => {
    try {
      const response = await fetch(pipeline.dataset.refresh, { credentials: "same-origin" });
      if (response.ok) {
        pipeline.innerHTML = await response.text();
        stamp.textContent = "updated " + new Date().toLocaleTimeString();
      }
    } catch (e) { stamp.textContent = "not updating: " + e; }
  }, 5000);
}
