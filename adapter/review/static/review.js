// The review pages' only script: Escape hides a mention's details (hover or focus content must be dismissible),
// and moving to another mention shows them again. No build step, no dependencies.
"use strict";
document.addEventListener("keydown", function (event) {
  if (event.key !== "Escape") return;
  var active = document.activeElement;
  if (active && active.classList && active.classList.contains("mention")) active.classList.add("tip-hidden");
  document.querySelectorAll(".mention:hover").forEach(function (m) { m.classList.add("tip-hidden"); });
});
document.addEventListener("focusin", function (event) {
  var target = event.target;
  if (target && target.classList && target.classList.contains("mention")) target.classList.remove("tip-hidden");
});
document.addEventListener("mouseover", function (event) {
  var mention = event.target && event.target.closest ? event.target.closest(".mention") : null;
  if (mention) mention.classList.remove("tip-hidden");
});
