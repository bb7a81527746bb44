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

// The add-mention form: "Use the selection" fills start and end from words selected in the note text. Only note
// text counts (the labels and details inside each mark are skipped). The form works by keyboard without it.
(function () {
  var button = document.getElementById("use-selection");
  var note = document.querySelector("pre.note");
  if (!button || !note) return;
  var chosen = null;
  function noteNodes() {
    var walker = document.createTreeWalker(note, NodeFilter.SHOW_TEXT, {
      acceptNode: function (n) { return n.parentElement.closest(".tag, .tip") ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT; }
    });
    var nodes = [], n;
    while ((n = walker.nextNode())) nodes.push(n);
    return nodes;
  }
  function offset(node, within) {
    var count = 0, nodes = noteNodes();
    for (var i = 0; i < nodes.length; i++) {
      if (nodes[i] === node) return count + within;
      count += nodes[i].textContent.length;
    }
    return -1;
  }
  document.addEventListener("selectionchange", function () {
    var selection = window.getSelection();
    if (!selection || selection.rangeCount === 0 || selection.isCollapsed) return;
    var range = selection.getRangeAt(0);
    if (!note.contains(range.startContainer) || !note.contains(range.endContainer)) return;
    var start = offset(range.startContainer, range.startOffset), end = offset(range.endContainer, range.endOffset);
    if (start >= 0 && end > start) {
      var text = noteNodes().map(function (n) { return n.textContent; }).join("");
      chosen = { start: start, end: end, text: text.slice(start, end) };
    }
  });
  button.hidden = false;
  button.addEventListener("click", function () {
    if (!chosen) return;
    document.getElementById("add-start").value = chosen.start;
    document.getElementById("add-end").value = chosen.end;
    document.getElementById("selection-text").textContent = "“" + chosen.text + "”";
  });
})();
