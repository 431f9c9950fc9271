import { StrictMode } from 'react';
import { createRoot } from 'react-dom/client';
import '../styles.css';
import './demo.css';
import { DemoApp } from './DemoApp';

const root = document.getElementById('root');
if (!root) throw new Error('index.html needs <div id="root">');
createRoot(root).render(
  <StrictMode>
    <DemoApp />
  </StrictMode>,
);
