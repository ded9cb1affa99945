// The dashboard's key view follows the key live: opens a lookup link,
// reads the count shown, then waits — without any reload — until the page
// shows a higher one (the demo keeps producing), and reports both.
//
// node dashboard-live.js BASE_URL AGGREGATION KEY
// (playwright-core on NODE_PATH; the browser from $WAGG_CHROMIUM.)
const { chromium } = require('playwright-core');

async function main() {
  const [base, aggregation, key] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: process.env.WAGG_CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu'],
  });
  try {
    const page = await browser.newPage();
    let navigations = 0;
    page.on('framenavigated', (frame) => { if (frame === page.mainFrame()) navigations += 1; });
    await page.goto(`${base}/?aggregation=${aggregation}&key=${encodeURIComponent(key)}`, { timeout: 20000 });
    const count = () => page.evaluate(() => {
      try { return JSON.parse(document.getElementById('state').textContent).count; } catch (e) { return null; }
    });
    await page.waitForFunction(
      () => document.getElementById('state').textContent.trim().startsWith('{'),
      null,
      { timeout: 20000 },
    );
    const before = await count();
    await page.waitForFunction(
      (shown) => {
        try { return JSON.parse(document.getElementById('state').textContent).count > shown; } catch (e) { return false; }
      },
      before,
      { timeout: 30000 },
    );
    const result = {
      before,
      after: await count(),
      updates: Number(await page.getAttribute('#state', 'data-updates')),
      live: await page.textContent('#live'),
      navigations,
    };
    console.log(JSON.stringify(result));
  } finally {
    await browser.close();
  }
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
