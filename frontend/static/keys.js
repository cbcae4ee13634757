// Keyboard navigation for browsing many features: ← and → follow the page's rel="prev" and rel="next"
// links (the feature page, the list's pager), "r" the random-feature link. Keys typed into a form
// field, or held with a modifier, are left alone.
document.addEventListener("keydown", function (event) {
  if (event.defaultPrevented || event.altKey || event.ctrlKey || event.metaKey || event.shiftKey) return;
  var target = event.target;
  if (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT|BUTTON)$/.test(target.tagName)) return;
  var selector = { ArrowLeft: 'a[rel="prev"]', ArrowRight: 'a[rel="next"]', r: 'a[data-key="r"]' }[event.key];
  var link = selector && document.querySelector(selector);
  if (link) {
    event.preventDefault();
    link.click();
  }
});
